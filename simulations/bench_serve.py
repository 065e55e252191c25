"""Benchmark of `fedbehavior serve` against the batch predict path, on loopback, in one run.

    .venv/bin/python -m simulations.bench_serve [--requests 2000] [--rate 200] [--model DIR]
        [--max-batch 32] [--window-ms 4] [--threads 0] [--predict-threads 0] [--precision fp32|bf16]

The model is the run config's default (MiniLM-L6, max-length 48, purchase-intent), untrained: a
`final/` written by `server.export.export_final` and merged by `server.hf_export.export_run` as a shop
would deploy it, in a temporary folder (or `--model`: any folder `serve` takes). The server runs in its
own process (`python -m client.serving.cli`), as it would beside the shop's systems. Then, on the same
N requests of one 10-event session each:

1. batch predict: `client.evaluation.predict.score` on all N sessions (batch 256), in this process,
   server idle;
2. fixed rate: N requests sent at `--rate` per second (open loop: each leaves at its slot whether or
   not earlier ones came back), then the generator stops; p50/p99/max latency and throughput;
3. saturation: N requests with `--concurrency` in flight at all times: the most the server answers.

Prints each figure and the ratio of the server's saturated throughput to batch predict's.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.serving import scorer_pb2, scorer_pb2_grpc

PRODUCTS = [
    ("iphone 12", "phones", 5999.0),
    ("galaxy s21", "phones", 4999.0),
    ("thinkpad x1", "laptops", 9999.0),
    ("macbook air", "laptops", 7999.0),
    ("running shoes", "shoes", 499.0),
    ("lipstick", "beauty", 199.0),
    ("desk lamp", "home", 129.0),
    ("三体", "books", 59.0),
    ("chocolate", "snacks", 25.0),
    ("lego city", "toys", 399.0),
]
ROLES = ["view"] * 6 + ["fav", "search", "cart", "promo_page"]


def sessions(n: int, seed: int = 0) -> list[scorer_pb2.ScoreRequest]:
    """`n` requests of one 10-event session each (distinct customers), reproducible from `seed`."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    out = []
    for i in range(n):
        t = start + timedelta(minutes=rng.randrange(60 * 24 * 30))
        events = []
        for _ in range(10):
            title, category, price = rng.choice(PRODUCTS)
            role = rng.choice(ROLES)
            event = scorer_pb2.Event(
                customer_id=f"c{i}", session_id=f"s{i}", timestamp=t.isoformat().replace("+00:00", "Z"),
                behavior=role, item_id=f"i{rng.randrange(1000)}",
            )  # fmt: skip
            if role == "search":
                event.query = f"{title} {category}"
            elif role != "promo_page":
                event.title, event.category, event.price = title, category, price
            events.append(event)
            t += timedelta(seconds=rng.randrange(5, 120))
        out.append(scorer_pb2.ScoreRequest(events=events))
    return out


def default_model(folder: Path) -> Path:
    """An untrained model of the default run config, exported as `fedbehavior export` writes it."""
    import json

    import torch

    from server.export import export_final
    from server.hf_export import export_run
    from shared.adapters import extract_adapter
    from shared.config import RunConfig
    from shared.model import build_model

    cfg = RunConfig.parse({})
    model = build_model(cfg.backbone, num_labels=cfg.task_spec.num_labels, lora=cfg.lora, pooling=cfg.pooling)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # some adapter values, so that the merge is not a no-op
        adapter = {k: torch.randn_like(v) * 0.01 for k, v in extract_adapter(model).items()}
    row = {"round": 0, "time_s": 0.0, "global": {}, "merchants": {}}
    (folder / "run").mkdir(parents=True, exist_ok=True)
    (folder / "run" / "metrics.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    export_final(model, adapter, folder / "run" / "final", cfg)
    return export_run(folder / "run", folder / "export")


def batch_predict(
    model: Path, requests: list[scorer_pb2.ScoreRequest], threads: int, precision: str = "fp32"
) -> float:
    """Sessions per second of `client.evaluation.predict.score` on the requests' events (batch 256)."""
    import torch

    from client.evaluation.predict import inputs_of, score
    from client.serving.batcher import autocast
    from client.serving.events import EventReader
    from shared.trained import load_trained

    if threads:
        torch.set_num_threads(threads)
    trained = load_trained(model)
    reader = EventReader()
    events = [e for r in requests for e in reader.events(r.events)]
    inputs, _ = inputs_of(trained.task, events)
    with autocast(trained, precision):  # the server's precision, so that like is compared with like
        score(trained, inputs[:256])  # warm-up
        start = time.perf_counter()
        rows = score(trained, inputs, batch_size=256)
        elapsed = time.perf_counter() - start
    assert len(rows) == len(requests)
    return len(rows) / elapsed


def start_server(
    model: Path, port: int, args: argparse.Namespace, extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """`fedbehavior serve` in its own process on loopback, once it reports SERVING; `extra`: more flags."""
    command = [
        sys.executable, "-m", "client.serving.cli", "--model", str(model), "--port", str(port),
        "--max-batch", str(args.max_batch), "--window-ms", str(args.window_ms),
        "--threads", str(args.threads), "--precision", args.precision, *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; run {' '.join(command)}")
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return process
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not report SERVING within 300 s")


def fixed_rate(
    stub: Any, requests: list[scorer_pb2.ScoreRequest], rate: float, timeout: float = 30
) -> dict[str, Any]:
    """Open-loop load: request i leaves at start + i / rate. Latencies in ms, throughput per second."""
    latencies: list[float] = []
    failures: list[str] = []
    done = threading.Semaphore(0)

    def finished(sent: float) -> Any:
        def callback(future: Any) -> None:
            if future.exception() is None:
                latencies.append((time.perf_counter() - sent) * 1000)
            else:
                failures.append(str(future.exception().code()))
            done.release()

        return callback

    start = time.perf_counter()
    for i, request in enumerate(requests):
        wait = start + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        sent = time.perf_counter()
        stub.Score.future(request, timeout=timeout).add_done_callback(finished(sent))
    for _ in requests:
        done.acquire()
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies) or [float("nan")]
    return {
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_ms": ordered[-1],
        "throughput": len(latencies) / elapsed,
        "failed": float(len(failures)),
        "codes": dict(Counter(failures)),
    }


def saturated(stub: Any, requests: list[scorer_pb2.ScoreRequest], concurrency: int) -> float:
    """Requests per second with `concurrency` requests in flight at all times."""
    slots = threading.Semaphore(concurrency)
    left = threading.Semaphore(0)

    def callback(future: Any) -> None:
        slots.release()
        left.release()

    start = time.perf_counter()
    for request in requests:
        slots.acquire()
        stub.Score.future(request, timeout=60).add_done_callback(callback)
    for _ in requests:
        left.acquire()
    return len(requests) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rate", default="200", help="requests per second, or several: 200,50 (fixed rate)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (saturation phase)")
    parser.add_argument(
        "--model", default="", help="a model folder (default: the default backbone, untrained)"
    )
    parser.add_argument("--port", type=int, default=50077)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--window-ms", type=float, default=4.0)
    parser.add_argument(
        "--threads", type=int, default=0, help="the server's torch threads (0: serve's default)"
    )
    parser.add_argument(
        "--predict-threads", type=int, default=0, help="torch threads of predict (0: default)"
    )
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="server and predict")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    requests = sessions(args.requests)
    with tempfile.TemporaryDirectory(prefix="fedbehavior-bench-serve-") as tmp:
        model = Path(args.model) if args.model else default_model(Path(tmp))
        predict_rate = batch_predict(model, requests, args.predict_threads, args.precision)
        print(
            f"batch predict: {predict_rate:.1f} sessions/s ({len(requests)} sessions, batch 256, "
            f"{args.precision}, torch threads {args.predict_threads or 'default'})",
            flush=True,
        )
        server = start_server(model, args.port, args)
        try:
            stub = scorer_pb2_grpc.ScorerStub(grpc.insecure_channel(f"127.0.0.1:{args.port}"))
            for request in requests[:50]:  # warm-up
                stub.Score(request, timeout=30)
            for rate in (float(r) for r in args.rate.split(",")):
                fixed = fixed_rate(stub, requests, rate)
                print(
                    f"serve at {rate:.0f} req/s: p50 {fixed['p50_ms']:.1f} ms, p99 {fixed['p99_ms']:.1f} ms, "
                    f"max {fixed['max_ms']:.1f} ms, throughput {fixed['throughput']:.1f} req/s, "
                    f"{fixed['failed']:.0f} failed {fixed['codes']}",
                    flush=True,
                )
            top = saturated(stub, requests, args.concurrency)
            print(f"serve saturated ({args.concurrency} in flight): {top:.1f} req/s")
            print(f"ratio serve/predict: {top / predict_rate:.2f}")
        finally:
            server.terminate()
            server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
