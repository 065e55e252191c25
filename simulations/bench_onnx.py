"""ONNX Runtime (float32 and int8 weights) against PyTorch eager, in one run, on MiniLM-L6.

    .venv/bin/python -m simulations.bench_onnx [--customers 400] [--features 1024] [--sessions 1024]
        [--requests 600] [--threads 0] [--repeats 2] [--no-serve]

Model: the run config's default (the packaged MiniLM-L6, max-length 48, unit-length mean pooling,
purchase-intent, head mode: LoRA frozen at B = 0). Data: one synthetic merchant
(`simulations.synthetic`, seed 7) built into examples as training builds them. Its head is trained here
without DP (logistic regression on eager features of the training customers), so that the AUC
compares scores a trained model gives.

Measured, each as examples (or requests) per second, eager / onnx fp32 / onnx int8:

(a) features: the pooled embeddings of `--features` training examples (padded to max-length, cut
    per chunk as `Encoded.inputs` does): `client.training.features.head_inputs` against
    `client.training.onnx_backbone.onnx_pooled_features`, 256 per pass;
(b) batch predict: `client.evaluation.predict.score` on `--sessions` 10-event sessions (batch 256),
    torch against     an ONNX runner of the same model, in this process;
(c) serve: `fedbehavior serve` (own process, `--runtime torch|onnx|onnx-int8`, `--threads`) saturated
    with `--concurrency` requests in flight, `--requests` one-session requests each.

Each measurement is repeated `--repeats` times, interleaved (eager, fp32, int8, eager, ...), and the
best is kept: on a shared machine the load changes under a run; the load average is printed before
and after. Then the held-out AUC (every held-out example of the merchant) of eager, fp32 and int8
scores of the same model, and of a head trained and evaluated on int8 features (the study with int8
features). Export and quantisation times (once per model, then cached) are printed too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RUNTIMES = ("torch", "onnx", "onnx-int8")
NAMES = {"torch": "eager", "onnx": "onnx fp32", "onnx-int8": "onnx int8"}


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def best_of(repeats: int, measures: dict[str, Callable[[], float]]) -> dict[str, float]:
    """The best rate of each measure over `repeats` interleaved rounds."""
    best = {name: 0.0 for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            best[name] = max(best[name], measure())
    return best


def report(title: str, rates: dict[str, float], unit: str) -> dict[str, float]:
    eager = rates["torch"]
    print(
        f"{title}: eager {eager:.1f} {unit}, onnx fp32 {rates['onnx']:.1f} ({rates['onnx'] / eager:.2f}x), "
        f"onnx int8 {rates['onnx-int8']:.1f} ({rates['onnx-int8'] / eager:.2f}x)",
        flush=True,
    )
    return {name: rate / eager for name, rate in rates.items()}


def train_head(features: torch.Tensor, labels: torch.Tensor, steps: int = 300) -> torch.nn.Linear:
    """Logistic regression (softmax, 2 classes) on `features`, no DP: full batch, Adam."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = torch.nn.Linear(features.shape[1], 2)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features), labels).backward()
        optimizer.step()
    return head.eval()


def set_head(model: torch.nn.Module, trained: torch.nn.Linear) -> None:
    """Copy `trained` into the model's trainable head (PEFT's modules_to_save copy)."""
    from client.training.features import head_module

    head = head_module(model)
    assert head is not None, "the default run config trains the head only"
    linear = next(m for m in head.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad)
    with torch.no_grad():
        linear.weight.copy_(trained.weight)
        linear.bias.copy_(trained.bias)


def export_model(model: torch.nn.Module, cfg: Any, folder: Path) -> Path:
    """The model as `fedbehavior export` writes it (what serve loads)."""
    import json

    from server.export import export_final
    from server.hf_export import export_run
    from shared.adapters import extract_adapter

    row = {"round": 0, "time_s": 0.0, "global": {}, "merchants": {}}
    (folder / "run").mkdir(parents=True, exist_ok=True)
    (folder / "run" / "metrics.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    export_final(model, extract_adapter(model), folder / "run" / "final", cfg)
    return export_run(folder / "run", folder / "export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--customers", type=int, default=400, help="synthetic merchant's base customers")
    parser.add_argument("--features", type=int, default=1024, help="examples embedded in (a)")
    parser.add_argument("--sessions", type=int, default=1024, help="sessions scored in (b)")
    parser.add_argument("--requests", type=int, default=600, help="requests per runtime in (c)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight in (c)")
    parser.add_argument("--threads", type=int, default=0, help="threads of every runtime (0: every core)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats, the best is kept")
    parser.add_argument("--port", type=int, default=50091)
    parser.add_argument("--no-serve", action="store_true", help="skip (c)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)

    from client.evaluation.predict import inputs_of, score
    from client.ingest.data import Encoder, load_merchant_data
    from client.serving.cli import default_threads
    from client.serving.events import EventReader
    from client.training.features import head_inputs, head_module
    from client.training.onnx_backbone import check_runtime, export_onnx, onnx_pooled_features, onnx_runner
    from shared.config import RunConfig
    from shared.metrics import roc_auc
    from shared.model import build_model, load_tokenizer
    from shared.trained import load_trained
    from simulations.bench_serve import saturated, sessions, start_server
    from simulations.synthetic import ensure_merchant

    check_runtime("onnx-int8")
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    print(f"start: {load()}; threads {threads} (torch and ONNX Runtime)", flush=True)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="fedbehavior-bench-onnx-") as tmp_name:
        tmp = Path(tmp_name)
        cache = tmp / "onnx-cache"
        os.environ["FEDBEHAVIOR_ONNX_CACHE"] = str(cache)  # this run's graphs, also for the servers

        cfg = RunConfig.parse({})
        model = build_model(cfg.backbone, num_labels=2, lora=cfg.lora, pooling=cfg.pooling)
        head = head_module(model)
        assert head is not None
        tokenizer = load_tokenizer(cfg.backbone)
        data = load_merchant_data(
            ensure_merchant(7, 0, tmp / "merchant", base_customers=args.customers), tmp / "quarantine",
            cfg.task_spec, eval_fraction=0.3, salt="bench-onnx",
        )  # fmt: skip
        encoder = Encoder(tokenizer, cfg.max_length)
        train = encoder.encode([c for cs in data.train_candidates.values() for c in cs][: args.features])
        held_out = encoder.encode([c for cs in data.eval_candidates.values() for c in cs])
        print(
            f"data: {len(train)} training examples ({int(train.labels.sum())} positive), {len(held_out)} "
            f"held-out ({int(held_out.labels.sum())} positive), max-length {cfg.max_length}",
            flush=True,
        )

        # first use: export and quantise (cached afterwards)
        for quantize in (False, True):
            start = time.perf_counter()
            export_onnx(model, head=False, quantize=quantize)
            kind = "int8 (export reused, quantised)" if quantize else "fp32 (export)"
            print(f"pooled graph {kind}: {time.perf_counter() - start:.1f} s, once per backbone", flush=True)

        # (a) features
        feats: dict[str, torch.Tensor] = {}

        def eager_features() -> float:
            start = time.perf_counter()
            feats["torch"] = head_inputs(model, head, train, device=cpu, chunk=256).values
            return len(train) / (time.perf_counter() - start)

        def onnx_features(quantize: bool) -> Callable[[], float]:
            def measure() -> float:
                start = time.perf_counter()
                values = onnx_pooled_features(model, train, chunk=256, quantize=quantize, threads=threads)
                feats["onnx-int8" if quantize else "onnx"] = values
                return len(train) / (time.perf_counter() - start)

            return measure

        onnx_pooled_features(model, train, rows=torch.arange(8), threads=threads)  # sessions built
        onnx_pooled_features(model, train, rows=torch.arange(8), quantize=True, threads=threads)
        rates = best_of(
            args.repeats,
            {"torch": eager_features, "onnx": onnx_features(False), "onnx-int8": onnx_features(True)},
        )
        ratios = {"features": report("(a) features (pooled embeddings)", rates, "examples/s")}
        for name in ("onnx", "onnx-int8"):
            gap = (feats[name] - feats["torch"]).abs().max().item()
            cosine = torch.nn.functional.cosine_similarity(feats[name], feats["torch"], dim=1).min().item()
            print(f"    {NAMES[name]} features: max abs gap to eager {gap:.2e}, least cosine {cosine:.5f}")

        # the head: trained on eager features (what the merchant's model scores with), installed in the model
        head_eager = train_head(feats["torch"], train.labels)
        set_head(model, head_eager)
        model.eval()  # build_model leaves it in training mode (dropout): score as predict does

        # AUC on the held-out examples: the same model scored eagerly, in fp32 and int8 ONNX Runtime
        batch = held_out.inputs(slice(None), cpu)
        with torch.no_grad():
            probs = {"torch": torch.softmax(model(**batch).logits, dim=-1)[:, 1]}
        start = time.perf_counter()
        runners = {name: onnx_runner(model, name, threads=threads) for name in ("onnx", "onnx-int8")}
        print(f"scores graph fp32 + int8: {time.perf_counter() - start:.1f} s (export, quantise): per model")
        for name, runner in runners.items():
            probs[name] = torch.cat(
                [
                    runner.probabilities(held_out.inputs(slice(s, s + 256), cpu))[:, 1]
                    for s in range(0, len(held_out), 256)
                ]
            )
        labels = held_out.labels.tolist()
        auc = {name: roc_auc(labels, p.tolist()) or float("nan") for name, p in probs.items()}
        for name in ("onnx", "onnx-int8"):
            gaps = (probs[name] - probs["torch"]).abs()
            flipped = ((probs[name] >= 0.5) != (probs["torch"] >= 0.5)).float().mean().item()
            print(
                f"    held-out AUC {NAMES[name]} {auc[name]:.4f} vs eager {auc['torch']:.4f}: difference "
                f"{auc[name] - auc['torch']:+.4f}; probability difference mean {gaps.mean().item():.2e}, "
                f"max {gaps.max().item():.2e}; predicted label changed for {100 * flipped:.1f}% of rows"
            )
        # the study with int8 features: a head trained and evaluated on int8 features
        held_int8 = onnx_pooled_features(model, held_out, quantize=True, threads=threads)
        head_int8 = train_head(feats["onnx-int8"], train.labels)
        with torch.no_grad():
            p_int8 = torch.softmax(head_int8(held_int8), dim=-1)[:, 1]
            p_eager = torch.softmax(
                head_eager(head_inputs(model, head, held_out, device=cpu, chunk=256).values), -1
            )[:, 1]
        auc_feat_int8 = roc_auc(labels, p_int8.tolist()) or float("nan")
        auc_feat_eager = roc_auc(labels, p_eager.tolist()) or float("nan")
        print(
            f"    head trained and evaluated on int8 features: AUC {auc_feat_int8:.4f} vs eager features "
            f"{auc_feat_eager:.4f}: difference {auc_feat_int8 - auc_feat_eager:+.4f}",
            flush=True,
        )

        # (b) batch predict on the exported model
        folder = export_model(model, cfg, tmp / "model")
        trained = load_trained(folder)
        requests = sessions(max(args.sessions, args.requests))
        reader = EventReader()
        events = [e for r in requests[: args.sessions] for e in reader.events(r.events)]
        inputs, _ = inputs_of(trained.task, events)
        predict_runners = {
            name: onnx_runner(trained.model, name, threads=threads) for name in ("onnx", "onnx-int8")
        }

        def batch_predict(runtime: str) -> Callable[[], float]:
            runner = predict_runners.get(runtime)

            def measure() -> float:
                score(trained, inputs[:64], batch_size=64, runner=runner)  # warm-up
                start = time.perf_counter()
                rows = score(trained, inputs, batch_size=256, runner=runner)
                return len(rows) / (time.perf_counter() - start)

            return measure

        logging.getLogger("client.evaluation.predict").setLevel(logging.WARNING)
        rates = best_of(args.repeats, {name: batch_predict(name) for name in RUNTIMES})
        ratios["predict"] = report(
            f"(b) batch predict ({len(inputs)} sessions, batch 256)", rates, "sessions/s"
        )

        # (c) serve, saturated: one server per runtime, measured in turn
        if not args.no_serve:
            import grpc

            from client.serving import scorer_pb2_grpc

            options = argparse.Namespace(max_batch=32, window_ms=4.0, threads=threads, precision="fp32")
            servers, stubs = [], {}
            try:
                for i, runtime in enumerate(RUNTIMES):
                    port = args.port + i
                    servers.append(start_server(folder, port, options, ("--runtime", runtime)))
                    stubs[runtime] = scorer_pb2_grpc.ScorerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
                    for request in requests[:30]:  # warm-up
                        stubs[runtime].Score(request, timeout=60)
                served = requests[: args.requests]

                def serve_rate(stub: Any) -> Callable[[], float]:
                    return lambda: saturated(stub, served, args.concurrency)

                rates = best_of(args.repeats, {name: serve_rate(stub) for name, stub in stubs.items()})
                ratios["serve"] = report(
                    f"(c) serve saturated ({args.concurrency} in flight, {len(served)} requests)",
                    rates,
                    "req/s",
                )
            finally:
                for server in servers:
                    server.terminate()
                    server.wait(60)

        print(f"end: {load()}")
        print(
            "summary int8/eager: "
            + ", ".join(f"{part} {r['onnx-int8']:.2f}x" for part, r in ratios.items())
            + "; fp32/eager: "
            + ", ".join(f"{part} {r['onnx']:.2f}x" for part, r in ratios.items())
            + f"; AUC int8 - eager {auc['onnx-int8'] - auc['torch']:+.4f} (goal: int8 >= 1.8x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
