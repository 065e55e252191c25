"""`fedbehavior serve`: real-time scoring of shop sessions over gRPC (service fedbehavior.v1.Scorer).

    fedbehavior serve --model runs/<name>/final --port 50051
    grpcurl -plaintext -d '{"events": [{"customer_id": "c1", "session_id": "s1",
        "timestamp": "2026-01-01T10:00:00Z", "behavior": "view", "title": "iphone 12"}]}' \\
        127.0.0.1:50051 fedbehavior.v1.Scorer/Score

Requests within --window-ms share one forward pass (at most --max-batch sessions). Health:
grpc.health.v1 (SERVING once the model is loaded, NOT_SERVING while shutting down). Reflection is on,
so grpcurl needs no .proto. Hot reload after a training run rewrote the folder: `kill -HUP <pid>` or the
Reload RPC; the new model is loaded in full, then swapped in, requests in flight are not dropped.
SIGTERM / Ctrl-C: stop accepting, finish in flight (--grace seconds), exit. Listens on 127.0.0.1
unless --host says otherwise; --tls-cert/--tls-key serve TLS.

Authentication: --token-file PATH holds a secret (at least 16 characters); every Scorer call then
carries the metadata `authorization: Bearer <secret>` (grpcurl -H 'authorization: Bearer ...').
Off loopback the server does not start without --token-file or mutual TLS (--tls-client-ca). The
Reload RPC always needs the token; without a token file, reload with SIGHUP.

Limits (each refusal is RESOURCE_EXHAUSTED and names its flag): --max-sessions and --max-events per
request, --max-request-bytes per message, --max-streams-per-caller and --max-streams open streams,
--stream-idle-s before an idle stream is closed, --max-queue queued requests. A forward pass holds at
most --max-batch sessions and at most --max-chunk of one request, so a large request is scored a
chunk at a time, shared fairly with the other callers' requests. Health says
NOT_SERVING for fedbehavior.v1.Scorer while more than --overload-sessions sessions are queued.

Runtime: --runtime torch (default) scores with PyTorch; onnx with ONNX Runtime on the CPU (the same
probabilities within 1e-4), onnx-int8 with int8 weights (the same ranking, probabilities moved by
~0.04 on average); both need pip install 'fedbehavior[onnx]', export the model when it is loaded
(cached under $FEDBEHAVIOR_ONNX_CACHE, default ~/.cache/fedbehavior/onnx) and use --threads threads.
Measured on a busy 2-core host: 1.8-4.7x (onnx) and 3.1-7.8x (onnx-int8) torch's saturated req/s
(simulations/bench_onnx.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def options_of(args: argparse.Namespace) -> Any:
    """ServeOptions from parsed arguments (bad values raise ValueError naming the flag)."""
    from client.serving.service import ServeOptions
    from shared.cli import parse_pairs
    from shared.config import parse_sets

    overrides = parse_sets(args.set)
    if args.task:
        overrides["task"] = args.task
    if min(args.max_batch, args.max_chunk, args.workers, args.max_queue) < 1 or args.window_ms < 0:
        raise ValueError(
            "--max-batch, --max-chunk, --max-queue and --workers must be >= 1 and --window-ms >= 0"
        )
    return ServeOptions(
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_chunk=args.max_chunk,
        window_ms=args.window_ms,
        max_queue=args.max_queue,
        workers=args.workers,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        behavior_map=parse_pairs(args.behavior_map, "--behavior-map"),
        strict=args.strict,
        overrides=overrides,
        device=args.device,
        precision=args.precision,
        runtime=args.runtime,
        threads=args.threads,
        max_sessions=args.max_sessions,
        max_events=args.max_events,
        max_request_bytes=args.max_request_bytes,
        max_streams_per_caller=args.max_streams_per_caller,
        max_streams=args.max_streams,
        stream_idle_s=args.stream_idle_s,
        overload_sessions=args.overload_sessions,
        token_file=Path(args.token_file) if args.token_file else None,
        tls_client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None,
    )


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """Torch threads when --threads is 0: the cores this process may use, less those other work keeps
    busy now (the 1-minute load average, rounded), at least one.

    Measured on the 2-core machine, quiet: 94 req/s saturated with 2 threads (batch predict: 93
    sessions/s), 61 with 1. On a host shared with other CPU-heavy jobs the opposite held (14 req/s
    with 2 threads, 45 with 1: a preempted thread stalls the others at each operator's barrier). So a
    quiet host gets every core, and a busy one only the cores its load leaves free."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this platform: every core
            load = 0.0
    busy = min(cores - 1, max(0, int(load + 0.5)))
    return max(1, cores - busy)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM / SIGINT; SIGHUP reloads the model folder."""
    import torch

    from client.serving.service import start_server

    threads = args.threads or default_threads()
    if not args.threads:
        log.info("%d scoring thread(s): --threads 0 takes the cores the load leaves free", threads)
    options = dataclasses.replace(options_of(args), threads=threads)  # torch's and ONNX Runtime's
    torch.set_num_threads(threads)
    # predict's per-call progress line would log every batch: one a few milliseconds
    logging.getLogger("client.evaluation.predict").setLevel(logging.WARNING)
    server = start_server(Path(args.model), options)
    print(
        f"serving {args.model} on {args.host}:{server.port} (pid: SIGHUP reloads, SIGTERM stops)", flush=True
    )
    done = threading.Event()

    def reload(*_: Any) -> None:
        def run() -> None:  # off the signal handler: loading takes seconds
            try:
                server.reload()
            except Exception:
                log.exception("reload failed; the old model stays in service")

        threading.Thread(target=run, name="fedbehavior-reload", daemon=True).start()

    def stop(*_: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, reload)
    while not done.wait(0.5):
        pass
    log.info("shutting down: finishing requests in flight (up to %.0f s)", args.grace)
    server.stop(args.grace)
    return 0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `serve` (limits' defaults are ServeOptions' own; a test keeps them equal)."""
    parser.add_argument("--model", required=True, help="runs/<name>/final, the run folder, or an export")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--tls-cert", default="", help="PEM certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", default="", help="PEM private key (with --tls-cert)")
    parser.add_argument(
        "--tls-client-ca", default="",
        help="mutual TLS: PEM CA whose certificates callers must present (with --tls-cert/--tls-key)",
    )  # fmt: skip
    parser.add_argument(
        "--token-file", default="",
        help="file holding the secret callers send as 'authorization: Bearer <secret>'; required off "
        "loopback unless --tls-client-ca, and by the Reload RPC",
    )  # fmt: skip
    parser.add_argument("--max-batch", type=int, default=32, help="sessions per forward pass")
    parser.add_argument(
        "--max-chunk", type=int, default=1,
        help="sessions of one request per forward pass: a large request goes this many at a time, so "
        "a caller queued behind it waits for a short pass (bulk scoring: fedbehavior merchant predict, "
        "or raise it for one trusted caller)",
    )  # fmt: skip
    parser.add_argument("--window-ms", type=float, default=4.0, help="how long a batch waits to fill")
    parser.add_argument(
        "--max-queue", type=int, default=1024, help="queued requests before RESOURCE_EXHAUSTED"
    )
    parser.add_argument("--workers", type=int, default=16, help="gRPC handler threads (default: %(default)s)")
    parser.add_argument(
        "--max-sessions", type=int, default=256,
        help="sessions one request may carry (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-events", type=int, default=10_000,
        help="events one request may carry (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-request-bytes", type=int, default=4 * 1024 * 1024,
        help="bytes of one request message (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-streams-per-caller", type=int, default=2,
        help="open ScoreStream calls per caller address (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-streams", type=int, default=8,
        help="open ScoreStream calls in all, below --workers (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--stream-idle-s", type=float, default=30.0,
        help="seconds a stream may wait for a request before it is closed (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--overload-sessions", type=int, default=1024,
        help="queued sessions past which health says NOT_SERVING; 0: never (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch or ONNX Runtime threads (0: the cores the host's load leaves free, at least 1)",
    )
    parser.add_argument("--grace", type=float, default=10.0, help="seconds to finish requests on SIGTERM")
    parser.add_argument("--behavior-map", action="append", default=[], metavar="NAME=BEHAVIOR")
    parser.add_argument("--strict", action="store_true", help="refuse behaviour names not in the map")
    parser.add_argument("--task", default="", help="the run's task, for a final/ without run-config.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="other run keys")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    parser.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16"),
        help="fp32: predict's exact scores; bf16: about 2x faster on CPUs with bf16 units, within ~1e-2",
    )  # fmt: skip
    parser.add_argument(
        "--runtime", default="torch", choices=("torch", "onnx", "onnx-int8"),
        help="torch (default); onnx: ONNX Runtime on the CPU, same scores within 1e-4; onnx-int8: int8 "
        "weights, fastest, same ranking but probabilities moved by ~0.04. "
        "Needs pip install 'fedbehavior[onnx]'",
    )  # fmt: skip
    parser.set_defaults(func=cmd_serve)


def add_serve_cli(subparsers: Any) -> None:
    """Register `serve` on the top-level subparsers."""
    parser = subparsers.add_parser(
        "serve", help="real-time scoring over gRPC (fedbehavior.v1.Scorer)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_serve_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    """`python -m client.serving.cli --model ...`: the same command without the entry point."""
    parser = argparse.ArgumentParser(prog="fedbehavior serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cmd_serve(args)


if __name__ == "__main__":
    from shared.cli import quiet_libraries

    quiet_libraries()
    sys.exit(main())
