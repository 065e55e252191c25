"""Does `fedbehavior serve` hold for honest callers while others abuse it? One run, on loopback.

    .venv/bin/python -m simulations.bench_serve_abuse [--duration 20] [--rate 5] [--abusers 2]
        [--max-sessions 256] [--max-batch 32] [--max-chunk 1] [--threads 1] [--model DIR]

The model and the server process are those of `simulations.bench_serve` (the default MiniLM,
untrained, exported; the server in its own process). Honest clients send one 10-event session per
request at `--rate` per second (open loop, 5 s deadline) for `--duration` seconds, twice:

1. alone;
2. while `--abusers` abusive clients each, in a loop, send a request of `--max-sessions` sessions
   (the most the server takes, 60 s deadline) and one just past it (refused: RESOURCE_EXHAUSTED),
   and each try to hold `--max-streams-per-caller` + 2 idle streams (those past the limit are refused;
   the others are closed after `--stream-idle-s`).

Prints the honest clients' p50/p99 latency and error counts in both phases, the ratio of the p99s
(goal: at most 2) and what the abusers got. All clients share 127.0.0.1, so the per-caller stream
limit counts them together, as it would for callers behind one NAT.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from client.serving import scorer_pb2, scorer_pb2_grpc
from simulations.bench_serve import default_model, fixed_rate, sessions, start_server


def merged(requests: list[scorer_pb2.ScoreRequest]) -> scorer_pb2.ScoreRequest:
    """One request holding the sessions of all `requests`."""
    return scorer_pb2.ScoreRequest(events=[e for r in requests for e in r.events])


class Abuser(threading.Thread):
    """Holds idle streams and sends the largest requests the server takes, back to back, until stopped."""

    def __init__(self, port: int, big: scorer_pb2.ScoreRequest, oversized: scorer_pb2.ScoreRequest,
                 streams: int, stop: threading.Event) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = scorer_pb2_grpc.ScorerStub(self.channel)
        self.big, self.oversized, self.streams, self.stop = big, oversized, streams, stop
        self.codes: Counter[str] = Counter()  # what the abuser's calls got
        self.lock = threading.Lock()

    def count(self, what: str) -> None:
        with self.lock:
            self.codes[what] += 1

    def hold_stream(self) -> None:
        call = self.stub.ScoreStream(_idle(self.stop), timeout=600)
        try:
            for _ in call:
                pass
            self.count("stream ended")
        except grpc.RpcError as err:
            self.count(f"stream {err.code().name}")

    def run(self) -> None:
        holders = [threading.Thread(target=self.hold_stream, daemon=True) for _ in range(self.streams)]
        for h in holders:
            h.start()
        while not self.stop.is_set():
            for request, name in ((self.oversized, "oversized"), (self.big, "max-size")):
                future = self.stub.Score.future(request, timeout=60)
                while not future.done() and not self.stop.wait(0.05):
                    pass
                if not future.done():
                    future.cancel()
                    break
                try:
                    future.result()
                    self.count(f"{name} OK")
                except grpc.RpcError as err:
                    self.count(f"{name} {err.code().name}")
        for h in holders:
            h.join(5)
        self.channel.close()


def _idle(stop: threading.Event) -> Any:
    """A request stream that sends nothing until `stop`."""
    stop.wait()
    yield from ()


def show(name: str, figures: dict[str, Any]) -> None:
    print(
        f"honest, {name}: p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, "
        f"max {figures['max_ms']:.1f} ms, {figures['failed']:.0f} errors {figures['codes']}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of honest load per phase")
    parser.add_argument("--rate", type=float, default=5.0, help="honest requests per second")
    parser.add_argument("--abusers", type=int, default=2)
    parser.add_argument(
        "--model", default="", help="a model folder (default: the default backbone, untrained)"
    )
    parser.add_argument("--port", type=int, default=50078)
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--max-chunk", type=int, default=1, help="the server's --max-chunk")
    parser.add_argument("--window-ms", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (0: every core)")
    parser.add_argument("--max-sessions", type=int, default=256, help="the server's --max-sessions")
    parser.add_argument("--max-streams-per-caller", type=int, default=2)
    parser.add_argument("--stream-idle-s", type=float, default=30.0)
    args = parser.parse_args(argv)
    args.precision = "fp32"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    honest = sessions(max(1, int(args.duration * args.rate)), seed=1)
    pool = sessions(args.max_sessions + 1, seed=2)
    big, oversized = merged(pool[: args.max_sessions]), merged(pool)
    extra = ("--max-sessions", str(args.max_sessions), "--max-chunk", str(args.max_chunk),
             "--max-streams-per-caller",
             str(args.max_streams_per_caller), "--stream-idle-s", str(args.stream_idle_s))  # fmt: skip
    print(
        f"honest: {args.rate:g} req/s of 1 session for {args.duration:g} s per phase; "
        f"abusers: {args.abusers} "
        f"sending {args.max_sessions}-session requests and holding {args.max_streams_per_caller + 2} idle "
        f"streams each; server --max-batch {args.max_batch} --threads {args.threads} {' '.join(extra)}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="fedbehavior-bench-abuse-") as tmp:
        model = Path(args.model) if args.model else default_model(Path(tmp))
        server = start_server(model, args.port, args, extra)
        try:
            stub = scorer_pb2_grpc.ScorerStub(grpc.insecure_channel(f"127.0.0.1:{args.port}"))
            for request in honest[:20]:  # warm-up
                stub.Score(request, timeout=30)
            alone = fixed_rate(stub, honest, args.rate, timeout=5)
            show("alone", alone)
            stop = threading.Event()
            abusers = [
                Abuser(args.port, big, oversized, args.max_streams_per_caller + 2, stop)
                for _ in range(args.abusers)
            ]
            for abuser in abusers:
                abuser.start()
            time.sleep(2.0)  # streams held, the first large requests queued
            attacked = fixed_rate(stub, honest, args.rate, timeout=5)
            stop.set()
            for abuser in abusers:
                abuser.join(30)
            show(f"with {args.abusers} abusers", attacked)
            ratio = attacked["p99_ms"] / alone["p99_ms"]
            print(f"ratio of honest p99 with abusers / alone: {ratio:.2f} (goal <= 2)")
            lost = int(attacked["failed"])
            print(f"honest requests lost with abusers: {lost} of {len(honest)}")
            total: Counter[str] = Counter()
            for abuser in abusers:
                total.update(abuser.codes)
            print(f"abusers got: {dict(sorted(total.items()))}", flush=True)
        finally:
            server.terminate()
            server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
