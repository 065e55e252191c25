"""Scale benchmark: time per round (first and later) and peak memory against customers per merchant
and against merchants, in one run, with the curves drawn to PNG.

    .venv/bin/python -m simulations.bench_scale [--customers 1000,10000,100000]
        [--reference-customers 1000] [--merchants 4,16,64] [--merchant-customers 100]
        [--backbone small] [--device auto] [--threads 1] [--out docs] [--json FILE] [--quick]
    .venv/bin/python -m simulations.bench_scale --from-json FILE --out docs   # redraw a run

Customers axis: ONE synthetic merchant (`simulations.synthetic`, `base_customers` = N; its real count is
N × 0.8–1.25), its rounds run directly through the training core without Flower
(`client.merchant.evaluate_round` / `train_round`, the merchant's own settings, ledger and feature
cache), as a Flower run would call them: round 0 = the initial evaluation (a fresh process: model,
tokenizer and data are loaded here), round 1 = train + evaluate (the training texts' features are
computed and cached), round 2 = train + evaluate (features from the cache, except texts round 1 did
not pick). The run config is the default plan (`trainable=head`, 10 local epochs on frozen features,
batch 64, 4 sessions per customer, max-length 48). Each point runs in its own fresh process, so its
peak memory (`ru_maxrss`, read in that process after each round) is its own, and each round is split
into phases by timing the core's own functions (exclusive time: a phase excludes the phases it calls):

    model      building the model and tokenizer (once per process)
    load       reading the events and building the customers' examples (once per process)
    tokenise   serialising examples to text (with its token counting) and tokenising them
               (`Encoder.encode`); texts stay in memory, so a later round re-tokenises only
    backbone   the frozen backbone's forward passes over texts the feature cache does not hold
    cache      feature-cache keys, lookups and writes
    dp-sgd     the DP-SGD steps on the features (Opacus per-customer gradients, clipping, noise)
    privacy    the ledger's charges (noise calibration, accounting)
    evaluate   the rest of an evaluation (admission, scoring the features, keeping the global adapter,
               the local baseline, noisy histograms)
    other      the rest of a training round (admission, adapter checks, outgoing guard)

The data is generated once per size (in its own process, timed, not part of any round).

Backbones: `--backbone small` (the default) is a 2-layer, 128-wide BERT built here from a config
(random weights, the packaged MiniLM-L6's vocabulary and tokenizer): the full 1k/10k/100k curve runs on
it. `--reference-customers` (1k; 10k takes another ~13 minutes on 2 cores) are also run with the packaged
MiniLM-L6 (the product's default backbone, 30-100 texts/s on a 2-core CPU, so 100k customers would take
hours); MiniLM's round at larger sizes is
then extrapolated from its measured texts/s and the small backbone's other phases, and labelled so.
`--backbone ""` runs the whole curve on MiniLM; any other value is a local folder or HF id.

Merchants axis: `simulations.run.simulate` (Flower + Ray, the product's simulation) with N merchants
of `--merchant-customers` customers each, 2 rounds, on the small backbone; time per round from the
run's metrics.jsonl (`time_s`), the coordinator's aggregation timed in its process, and the peak
memory of the whole process tree (Ray's GCS, raylet and workers are children of the driver), polled
with psutil every 0.5 s: the sum of PSS (shared pages divided between the processes that share them)
and of RSS (shared pages counted in every process: an upper bound). Flower's Ray backend runs
CPUs ÷ `--cpus-per-merchant` actors whatever N is: the merchants take turns on them.

`--device cuda` runs the merchants' training and features on a GPU (CUDA peak memory is printed for
the customers axis). `--threads` is torch's threads in a customers-axis process: 1 by default, as Ray
gives each simulated merchant's actor (OMP_NUM_THREADS from its one CPU), and because on a busy 2-core
host two threads were an order of magnitude slower. `--quick` is a tiny grid for the smoke test.
`--out` is where the PNGs go.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

SMALL = "small"
SMALL_LABEL = "BERT-L2-H128 (config-built)"
MINILM_LABEL = "MiniLM-L6 (packaged)"
PHASES = ("model", "load", "tokenise", "backbone", "cache", "dp-sgd", "privacy", "evaluate", "other")
ROUNDS = 2  # training rounds after the initial evaluation (round 0)
SEED = 7  # the simulation's default sim-seed: the same shops `fedbehavior simulate` would make

F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------------------------------
# backbones


def build_small_bert(folder: Path, *, layers: int = 2, hidden: int = 128) -> Path:
    """A small BERT (random weights, seed 0) with the packaged MiniLM-L6's tokenizer, saved to `folder`
    (built once; loadable by `from_pretrained` like any backbone folder)."""
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from shared.model import default_backbone

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(default_backbone())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def short(label: str) -> str:
    return {SMALL_LABEL: "small", MINILM_LABEL: "MiniLM"}.get(label, label[:12])


def backbone_label(name: str) -> str:
    if name == SMALL:
        return SMALL_LABEL
    if name in ("", "minilm"):
        return MINILM_LABEL
    return name


# --------------------------------------------------------------------------------------------------
# phase timing (inside a customers-axis worker)


class Phases:
    """Exclusive wall time per phase: a wrapped call's time minus that of wrapped calls inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()

    def wrap(self, name: str, fn: F) -> F:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._stack.append([0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = self._stack.pop()[0]
                self.seconds[name] += elapsed - inner
                if self._stack:
                    self._stack[-1][0] += elapsed

        return timed  # type: ignore[return-value]


def instrument(phases: Phases) -> None:
    """Wrap the training core's functions (module attributes, as the core looks them up at call time)."""
    import client.ingest.data
    import client.merchant
    import client.training.budget
    import client.training.features
    import client.training.loop

    merchant = client.merchant
    merchant.build_model = phases.wrap("model", merchant.build_model)  # type: ignore[assignment]
    merchant.load_tokenizer = phases.wrap("model", merchant.load_tokenizer)  # type: ignore[assignment]
    merchant.load_merchant_data = phases.wrap("load", merchant.load_merchant_data)  # type: ignore[assignment]
    client.ingest.data.Encoder.encode = phases.wrap("tokenise", client.ingest.data.Encoder.encode)  # type: ignore[method-assign]
    client.training.loop.head_inputs = phases.wrap("cache", client.training.loop.head_inputs)  # type: ignore[assignment]
    forward = client.training.features._backbone_features

    def counted(model: Any, head: Any, data: Any, rows: Any, **kwargs: Any) -> Any:
        phases.counts["backbone_rows"] += len(data) if rows is None else len(rows)
        return forward(model, head, data, rows, **kwargs)

    client.training.features._backbone_features = phases.wrap("backbone", counted)  # type: ignore[assignment]
    merchant.train_dp = phases.wrap("dp-sgd", merchant.train_dp)  # type: ignore[assignment]
    for charge in ("training_charge", "evaluation_charge", "public_size"):
        setattr(
            client.training.budget, charge, phases.wrap("privacy", getattr(client.training.budget, charge))
        )
    merchant.predict = phases.wrap("evaluate", merchant.predict)  # type: ignore[assignment]


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def customers_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One merchant's rounds 0..ROUNDS through the training core; runs in its own process."""
    started = time.perf_counter()
    import torch

    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    from client import merchant
    from client.settings import MerchantSettings, RunPolicy
    from shared.adapters import extract_adapter
    from shared.config import RunConfig
    from shared.model import build_model, resolve_device

    imports_s = time.perf_counter() - started
    rss_imports = maxrss_mib()
    backbone = spec["backbone"]
    phases = Phases()
    instrument(phases)
    settings = MerchantSettings.from_merchant_dir(
        Path(spec["data"]),
        state_dir=Path(spec["state"]),
        device=spec["device"],
        policy=RunPolicy(backbones=("", backbone)),
    )
    cfg = RunConfig.parse({"backbone": backbone, "num-rounds": ROUNDS})
    # the coordinator's initial global adapter (its own model, as `server.coordinator` builds it)
    setup = time.perf_counter()
    coordinator_model = build_model(
        backbone,
        num_labels=cfg.task_spec.num_labels,
        lora=cfg.lora,
        init_seed=cfg.seed,
        pooling=cfg.pooling,
    )
    adapter = extract_adapter(coordinator_model)
    del coordinator_model
    setup_s = time.perf_counter() - setup
    run_id = spec["run_id"]
    cuda = resolve_device(settings.device).type == "cuda"
    rounds: list[dict[str, Any]] = []
    for rnd in range(ROUNDS + 1):
        phases.reset()
        start = time.perf_counter()
        trained_texts = 0
        if rnd > 0:
            outcome = phases.wrap("other", merchant.train_round)(
                settings, cfg, adapter, server_round=rnd, run_id=run_id
            )
            if outcome.status != "trained" or outcome.adapter is None:
                raise RuntimeError(f"round {rnd}: {outcome.status} ({outcome.reason})")
            adapter = outcome.adapter  # one merchant: the aggregate is its update
            trained_texts = int(outcome.local.get("examples", 0))
        evaluation = phases.wrap("evaluate", merchant.evaluate_round)(
            settings, cfg, adapter, server_round=rnd, run_id=run_id
        )
        if evaluation.status != "evaluated":
            raise RuntimeError(f"round {rnd} evaluation: {evaluation.status} ({evaluation.reason})")
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        rounds.append(
            {
                "round": rnd,
                "wall_s": wall,
                "phases": {p: phases.seconds.get(p, 0.0) for p in PHASES},
                "backbone_rows": phases.counts.get("backbone_rows", 0),
                "train_texts": trained_texts,
                "maxrss_mib": maxrss_mib(),
            }
        )
    data = merchant._data(settings, cfg)
    cache = merchant.feature_cache(settings)
    return {
        "backbone": backbone,
        "label": spec["label"],
        "base": spec["base"],
        "train_customers": len(data.train_customers),
        "eval_customers": len(data.eval_customers),
        "events": data.load_report.good,
        "eval_texts": len(data.evaluation()),
        "imports_s": imports_s,
        "setup_s": setup_s,
        "rss_imports_mib": rss_imports,
        "peak_mib": maxrss_mib(),
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "cache_mib": (cache.size_bytes() / 2**20) if cache is not None else 0.0,
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
    }


def generate_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The synthetic shop of `base` customers (seed 7, merchant 0); kept in a kept --workdir, with the
    time it took to generate."""
    from simulations.synthetic import generate_merchant

    folder = Path(spec["data"])
    record = folder / "generated.json"
    if record.exists():
        return dict(json.loads(record.read_text(encoding="utf-8")))
    start = time.perf_counter()
    generate_merchant(SEED, 0, folder, base_customers=spec["base"])
    result = {"generate_s": time.perf_counter() - start, "peak_mib": maxrss_mib()}
    record.write_text(json.dumps(result), encoding="utf-8")
    return result


# --------------------------------------------------------------------------------------------------
# merchants axis (inside a worker: the simulation's driver)


def merchants_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import logging

    import server.coordinator as coordinator
    from server.metrics import MetricsLog
    from simulations.run import simulate

    logging.basicConfig(level=logging.WARNING)
    server_s: dict[str, float] = defaultdict(float)
    lock = threading.Lock()

    def timed(name: str, fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    server_s[name] += time.perf_counter() - start

        return wrapper  # type: ignore[return-value]

    # the coordinator's own work (it runs in this process): screening and aggregating the updates,
    # pooling the noisy evaluations, checkpoints and the final export
    coordinator.screen_updates = timed("aggregate", coordinator.screen_updates)  # type: ignore[assignment]
    coordinator.aggregate_delta = timed("aggregate", coordinator.aggregate_delta)  # type: ignore[assignment]
    coordinator.pool_evaluations = timed("pool", coordinator.pool_evaluations)  # type: ignore[assignment]
    coordinator.save_checkpoint = timed("checkpoint", coordinator.save_checkpoint)  # type: ignore[assignment]
    n = int(spec["merchants"])
    overrides = {
        "backbone": spec["backbone"],
        "num-rounds": ROUNDS,
        "sim-customers": spec["customers"],
        "min-available-nodes": n,
        "min-train-nodes": n,
        "min-evaluate-nodes": n,
        "runs-dir": spec["runs"],
        "run-name": f"merchants-{n}",
        "sim-root": spec["sim_root"],
    }
    start = time.perf_counter()
    run_dir = simulate(
        overrides,
        merchants=n,
        cpus_per_merchant=spec["cpus_per_merchant"],
        gpus_per_merchant=spec["gpus_per_merchant"],
    )
    total = time.perf_counter() - start
    rows = MetricsLog(run_dir / "metrics.jsonl").rows()
    marks = [float(r["time_s"]) for r in rows]
    per_round = [marks[0]] + [b - a for a, b in itertools.pairwise(marks)]
    trained = [
        sum(1 for m in r.get("merchants", {}).values() if m.get("status") in ("trained", "evaluated"))
        for r in rows
    ]
    return {
        "merchants": n,
        "customers": spec["customers"],
        "round_s": per_round,
        "answered": trained,
        "total_s": total,
        "outside_rounds_s": total - marks[-1],
        "server_s": dict(server_s),
        "driver_peak_mib": maxrss_mib(),
    }


# --------------------------------------------------------------------------------------------------
# the parent: points in fresh processes, memory of process trees


@dataclass
class TreeMemory:
    """Peak of the summed PSS and RSS of a process and all its descendants, polled in a thread."""

    pid: int
    interval: float = 0.5
    peak_pss: float = 0.0
    peak_rss: float = 0.0
    peak_processes: int = 0
    seen: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            pss = rss = 0.0
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                pss += getattr(info, "pss", info.rss)
                rss += info.rss
                self.seen.add(proc.pid)
            if pss > self.peak_pss:
                self.peak_pss, self.peak_processes = pss, len(procs)
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_worker(
    kind: str, spec: dict[str, Any], log_path: Path, timeout: float, *, tree: bool = False
) -> tuple[dict[str, Any] | None, TreeMemory | None, str]:
    """Run `kind` in a fresh process (its own session, so a timeout ends all of it); its result,
    the tree's memory when `tree`, and why it failed ('' if it did not)."""
    result_path = log_path.with_suffix(".json")
    result_path.unlink(missing_ok=True)
    spec_arg = json.dumps(spec)
    cmd = [sys.executable, "-m", "simulations.bench_scale", "--worker", kind, "--spec", spec_arg]
    cmd += ["--result", str(result_path)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        memory = TreeMemory(proc.pid) if tree else None
        why = ""
        try:
            code = proc.wait(timeout=timeout)
            if code != 0:
                why = f"exit code {code}"
        except subprocess.TimeoutExpired:
            why = f"timed out after {timeout:.0f} s"
            _end_session(proc, memory)
        finally:
            if memory is not None:
                memory.stop()
    if why:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        print(f"  {kind} {spec.get('label', '')} failed ({why}); last lines of {log_path}:", flush=True)
        print("    " + "\n    ".join(tail), flush=True)
        return None, memory, why
    return json.loads(result_path.read_text(encoding="utf-8")), memory, ""


def _end_session(proc: subprocess.Popen[bytes], memory: TreeMemory | None) -> None:
    """End the worker's process group, then any descendant that left it (Ray's), by pid."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if memory is None:
        return
    import psutil

    for pid in memory.seen:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def parse_sizes(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part.strip()]


def fmt_n(n: float) -> str:
    if n >= 1000 and n % 1000 == 0:
        return f"{n / 1000:g}k"
    return f"{n:g}"


def load_text() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


# --------------------------------------------------------------------------------------------------
# reporting


def customers_table(points: list[dict[str, Any]]) -> list[str]:
    head = (
        f"{'backbone':<28} {'N':>5} {'customers':>14} {'texts r1':>9} {'gen s':>6} {'r0 s':>7} "
        f"{'r1 s':>7} {'r2 s':>7} {'r2÷r1':>6} {'peak MiB':>9} {'floor':>6}"
    )
    lines = [head, "-" * len(head)]
    for p in points:
        r = p["rounds"]
        customers = f"{p['train_customers']}+{p['eval_customers']}"
        lines.append(
            f"{p['label']:<28} {fmt_n(p['base']):>5} {customers:>14} {r[1]['train_texts']:>9} "
            f"{p['generate_s']:>6.1f} {r[0]['wall_s']:>7.1f} {r[1]['wall_s']:>7.1f} {r[2]['wall_s']:>7.1f} "
            f"{r[2]['wall_s'] / r[1]['wall_s']:>6.2f} {p['peak_mib']:>9.0f} {p['rss_imports_mib']:>6.0f}"
        )
    return lines


def phases_table(points: list[dict[str, Any]]) -> list[str]:
    head = f"{'backbone':<28} {'N':>5} {'rnd':>3} " + " ".join(f"{p:>8}" for p in PHASES)
    head += f" {'wall':>8} {'computed':>9} {'peak MiB':>9}"
    lines = [head, "-" * len(head)]
    for p in points:
        for r in p["rounds"]:
            cells = " ".join(f"{r['phases'][name]:>8.1f}" for name in PHASES)
            lines.append(
                f"{p['label']:<28} {fmt_n(p['base']):>5} {r['round']:>3} {cells} {r['wall_s']:>8.1f} "
                f"{r['backbone_rows']:>9} {r['maxrss_mib']:>9.0f}"
            )
    return lines


def merchants_table(points: list[dict[str, Any]]) -> list[str]:
    head = (
        f"{'merchants':>9} {'customers':>9} {'r0 s':>7} {'r1 s':>7} {'r2 s':>7} {'r2÷r1':>6} "
        f"{'r2 s/merchant':>13} {'start+end s':>11} {'total s':>8} {'agg s/rnd':>9} {'PSS MiB':>8} "
        f"{'RSS MiB':>8} {'procs':>5}"
    )
    lines = [head, "-" * len(head)]
    for p in points:
        r = p["round_s"]
        agg = (p["server_s"].get("aggregate", 0.0)) / ROUNDS
        lines.append(
            f"{p['merchants']:>9} {p['customers']:>9} {r[0]:>7.1f} {r[1]:>7.1f} {r[2]:>7.1f} "
            f"{r[2] / r[1]:>6.2f} {r[2] / p['merchants']:>13.2f} {p['outside_rounds_s']:>11.1f} "
            f"{p['total_s']:>8.1f} {agg:>9.3f} "
            f"{p['peak_pss_mib']:>8.0f} {p['peak_rss_mib']:>8.0f} {p['processes']:>5}"
        )
    return lines


def exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Growth exponent b of y ∝ x^b between the first and last point (log-log slope)."""
    if len(xs) < 2 or min(ys) <= 0 or xs[0] == xs[-1]:
        return math.nan
    return math.log(ys[-1] / ys[0]) / math.log(xs[-1] / xs[0])


def dominant(phases: dict[str, float]) -> str:
    total = sum(phases.values()) or 1.0
    top = sorted(phases.items(), key=lambda kv: -kv[1])[:2]
    return ", ".join(f"{name} {100 * s / total:.0f}%" for name, s in top)


def extrapolate_minilm(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """MiniLM-L6's rounds at the small backbone's sizes it was not run at: the small backbone's
    measured phases with its backbone time replaced by its texts at MiniLM's measured texts/s."""
    minilm = [p for p in points if p["label"] == MINILM_LABEL]
    small = [p for p in points if p["label"] == SMALL_LABEL]
    if not minilm or not small:
        return []
    ref = max(minilm, key=lambda p: p["base"])
    rows = sum(r["backbone_rows"] for r in ref["rounds"])
    secs = sum(r["phases"]["backbone"] for r in ref["rounds"])
    if rows == 0 or secs <= 0:
        return []
    rate = rows / secs
    measured = {p["base"] for p in minilm}
    out = []
    for p in small:
        if p["base"] in measured:
            continue
        est = [r["wall_s"] - r["phases"]["backbone"] + r["backbone_rows"] / rate for r in p["rounds"]]
        out.append({"base": p["base"], "rate": rate, "ref_base": ref["base"], "round_s": est, "from": p})
    return out


def exponents(xs: Sequence[float], ys: Sequence[float]) -> str:
    """The log-log slope over each segment between successive points, e.g. '0.41, 0.93'."""
    return ", ".join(
        f"{exponent([x0, x1], [y0, y1]):.2f}"
        for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True))
    )


def growth_lines(
    points: list[dict[str, Any]], merchants: list[dict[str, Any]], extrapolated: list[dict[str, Any]]
) -> list[str]:
    lines = []
    labels = list(dict.fromkeys(p["label"] for p in points))
    for label in labels:
        series = sorted((p for p in points if p["label"] == label), key=lambda p: p["base"])
        xs = [float(p["train_customers"] + p["eval_customers"]) for p in series]
        sizes = " → ".join(fmt_n(p["base"]) for p in series)
        for rnd, name in ((0, "initial evaluation (r0)"), (1, "first round (r1)"), (2, "later round (r2)")):
            ys = [p["rounds"][rnd]["wall_s"] for p in series]
            times = " → ".join(f"{y:.1f}" for y in ys)
            growth = f"; time ∝ customers^({exponents(xs, ys)})" if len(series) > 1 else ""
            shares = "; ".join(f"{fmt_n(p['base'])}: {dominant(p['rounds'][rnd]['phases'])}" for p in series)
            lines.append(f"{label}, {name}: {times} s at {sizes}{growth}; largest phases {shares}")
        mem = [p["peak_mib"] for p in series]
        floor = statistics.mean(p["rss_imports_mib"] for p in series)
        line = f"{label}, peak memory: " + " → ".join(f"{m:.0f}" for m in mem) + f" MiB at {sizes}"
        line += f" (floor after imports ~{floor:.0f} MiB"
        if len(series) > 1 and xs[-1] > xs[-2]:
            per = (mem[-1] - mem[-2]) / (xs[-1] - xs[-2]) * 1024
            extra = [max(1.0, m - floor) for m in mem]
            line += f"; above it ∝ customers^({exponents(xs, extra)}), ~{per:.0f} KiB per customer at the top"
        lines.append(line + ")")
    for e in extrapolated:
        r = e["round_s"]
        lines.append(
            f"MiniLM-L6 at {fmt_n(e['base'])} (EXTRAPOLATED, not run: {e['rate']:.0f} texts/s measured at "
            f"{fmt_n(e['ref_base'])}, other phases from the small backbone): r0 ~{r[0]:.0f} s, "
            f"r1 ~{r[1]:.0f} s, r2 ~{r[2]:.0f} s"
        )
    if merchants:
        ms = sorted(merchants, key=lambda p: p["merchants"])
        xs = [float(p["merchants"]) for p in ms]
        counts = " → ".join(str(p["merchants"]) for p in ms)
        for rnd, name in ((0, "initial evaluation (r0)"), (1, "first round (r1)"), (2, "later round (r2)")):
            ys = [p["round_s"][rnd] for p in ms]
            per = " → ".join(f"{y / x:.2f}" for x, y in zip(xs, ys, strict=True))
            growth = f"time ∝ merchants^({exponents(xs, ys)}); " if len(ms) > 1 else ""
            lines.append(
                f"simulation, {name}: " + " → ".join(f"{y:.1f}" for y in ys) + f" s at {counts} merchants "
                f"({growth}{per} s per merchant)"
            )
        agg = [p["server_s"].get("aggregate", 0.0) / ROUNDS for p in ms]
        lines.append(
            "simulation, the coordinator's screening + aggregation: "
            + " → ".join(f"{a * 1000:.0f}" for a in agg)
            + " ms per round (head-only updates)"
        )
        pss = [p["peak_pss_mib"] for p in ms]
        lines.append(
            "simulation, peak memory of the process tree (PSS): "
            + " → ".join(f"{m:.0f}" for m in pss)
            + f" MiB; {ms[-1]['processes']} processes at the peak: Flower's Ray backend runs "
            "CPUs ÷ cpus-per-merchant actors, each holding one model, whatever the number of merchants"
        )
    return lines


def slowest(points: list[dict[str, Any]], merchants: list[dict[str, Any]]) -> str:
    candidates: list[tuple[float, str]] = []
    for p in points:
        for r in p["rounds"]:
            candidates.append(
                (
                    r["wall_s"],
                    f"{p['label']}, {fmt_n(p['base'])} customers, round {r['round']}: {r['wall_s']:.1f} s "
                    f"(mostly {dominant(r['phases'])})",
                )
            )
    for m in merchants:
        for i, t in enumerate(m["round_s"]):
            candidates.append((t, f"simulation of {m['merchants']} merchants, round {i}: {t:.1f} s"))
    if not candidates:
        return "none"
    return max(candidates)[1]


def plain_ticks(ax: Any) -> None:
    """Log axes labelled 1000, 10000 … rather than 10^3."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
        if scale == "log":
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(FuncFormatter(lambda *_: ""))


def plot_customers(points: list[dict[str, Any]], extrapolated: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    time_ax, mem_ax, phase_ax = axes
    colors = {SMALL_LABEL: "tab:blue", MINILM_LABEL: "tab:orange"}
    labels = list(dict.fromkeys(p["label"] for p in points))
    for label in labels:
        series = sorted((p for p in points if p["label"] == label), key=lambda p: p["base"])
        xs = [p["train_customers"] + p["eval_customers"] for p in series]
        color = colors.get(label, "tab:green")
        for rnd, style, name in ((1, "-o", "round 1 (first)"), (2, "--s", "round 2 (later)")):
            time_ax.plot(
                xs, [p["rounds"][rnd]["wall_s"] for p in series], style, color=color, label=f"{label}, {name}"
            )
        mem_ax.plot(xs, [p["peak_mib"] for p in series], "-o", color=color, label=label)
    for e in extrapolated:
        src = e["from"]
        x = src["train_customers"] + src["eval_customers"]
        for rnd, marker in ((1, "o"), (2, "s")):
            time_ax.plot(x, e["round_s"][rnd], marker, mfc="none", color=colors[MINILM_LABEL])
    if extrapolated:
        minilm = sorted((p for p in points if p["label"] == MINILM_LABEL), key=lambda p: p["base"])
        last = minilm[-1]
        xs = [last["train_customers"] + last["eval_customers"]] + [
            e["from"]["train_customers"] + e["from"]["eval_customers"] for e in extrapolated
        ]
        for rnd in (1, 2):
            ys = [last["rounds"][rnd]["wall_s"]] + [e["round_s"][rnd] for e in extrapolated]
            time_ax.plot(
                xs,
                ys,
                ":",
                color=colors[MINILM_LABEL],
                label="MiniLM-L6, extrapolated" if rnd == 1 else None,
            )
    time_ax.set(
        xscale="log",
        yscale="log",
        xlabel="customers of the merchant",
        ylabel="seconds per round",
        title="Time per round (train + evaluate)",
    )
    plain_ticks(time_ax)
    time_ax.grid(True, which="both", alpha=0.3)
    time_ax.legend(fontsize=7)
    mem_ax.set(
        xscale="log",
        xlabel="customers of the merchant",
        ylabel="MiB",
        title="Peak memory of the merchant's process",
    )
    plain_ticks(mem_ax)
    mem_ax.set_ylim(bottom=0)
    mem_ax.grid(True, which="both", alpha=0.3)
    mem_ax.legend(fontsize=7)
    bars = [(p, rnd) for p in points for rnd in (1, 2)]
    names = [f"{short(p['label'])} {fmt_n(p['base'])} r{rnd}" for p, rnd in bars]
    bottom = [0.0] * len(bars)
    cmap = plt.get_cmap("tab10")
    for i, phase in enumerate(PHASES):
        shares = []
        for p, rnd in bars:
            r = p["rounds"][rnd]
            shares.append(100 * r["phases"][phase] / max(sum(r["phases"].values()), 1e-9))
        phase_ax.bar(range(len(bars)), shares, bottom=bottom, color=cmap(i), label=phase)
        bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
    phase_ax.set_xticks(range(len(bars)), names, rotation=60, ha="right", fontsize=7)
    phase_ax.set(ylabel="% of the round", title="Where a round's time goes")
    phase_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_merchants(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = sorted(points, key=lambda p: p["merchants"])
    xs = [p["merchants"] for p in ms]
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for rnd, style, name in (
        (0, ":^", "round 0 (initial evaluation)"),
        (1, "-o", "round 1 (first)"),
        (2, "--s", "round 2 (later)"),
    ):
        time_ax.plot(xs, [p["round_s"][rnd] for p in ms], style, label=name)
    time_ax.set(
        xscale="log",
        yscale="log",
        xlabel="merchants (simulated, Flower + Ray)",
        ylabel="seconds per round",
        title=f"Time per round, {ms[0]['customers']} customers each",
    )
    plain_ticks(time_ax)
    time_ax.set_xticks(xs, [str(x) for x in xs])
    time_ax.minorticks_off()
    time_ax.grid(True, which="both", alpha=0.3)
    time_ax.legend(fontsize=8)
    mem_ax.plot(xs, [p["peak_pss_mib"] for p in ms], "-o", label="sum of PSS (shared pages split)")
    mem_ax.plot(xs, [p["peak_rss_mib"] for p in ms], "--s", label="sum of RSS (upper bound)")
    mem_ax.set(
        xscale="log",
        xlabel="merchants (simulated, Flower + Ray)",
        ylabel="MiB",
        title="Peak memory of the whole process tree",
    )
    plain_ticks(mem_ax)
    mem_ax.set_xticks(xs, [str(x) for x in xs])
    mem_ax.minorticks_off()
    mem_ax.set_ylim(bottom=0)
    mem_ax.grid(True, which="both", alpha=0.3)
    mem_ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--customers", default="1000,10000,100000", help="sizes on --backbone (comma list)")
    parser.add_argument(
        "--reference-customers",
        default="1000",
        help="sizes also run on the packaged MiniLM-L6 (comma list; empty: none)",
    )
    parser.add_argument("--merchants", default="4,16,64", help="simulated merchant counts (empty: none)")
    parser.add_argument("--merchant-customers", type=int, default=100, help="customers per merchant")
    parser.add_argument("--cpus-per-merchant", type=float, default=1.0, help="Ray CPUs per merchant actor")
    parser.add_argument("--gpus-per-merchant", type=float, default=None, help="default: 0, or 0.25 on cuda")
    parser.add_argument(
        "--backbone",
        default=SMALL,
        help='"small" (a 2-layer, 128-wide BERT built from a config), "" for the packaged MiniLM-L6, '
        "or a local folder",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the customers axis' merchant process (0: torch's default, one per core); "
        "1, as each Ray actor of the simulation gets from its 1 CPU",
    )
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder of the PNGs")
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given (default: a temp folder)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per point")
    parser.add_argument("--quick", action="store_true", help="a tiny grid (smoke test): 30,60 / 2 merchants")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="re-print and redraw a --json file; measures nothing"
    )
    parser.add_argument("--worker", choices=("customers", "merchants", "generate"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.customers, args.reference_customers = "30,60", ""
        args.merchants, args.merchant_customers = "2", 20
    return args


def worker_main(args: argparse.Namespace) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = json.loads(args.spec)
    run: Callable[[dict[str, Any]], dict[str, Any]] = {
        "customers": customers_worker,
        "merchants": merchants_worker,
        "generate": generate_worker,
    }[args.worker]
    result = run(spec)
    args.result.write_text(json.dumps(result), encoding="utf-8")


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every point of the grid, each in its own process: the measurements and what failed."""
    if args.backbone == SMALL:
        backbone = str(build_small_bert(work / "backbones" / "bert-l2-h128"))
    elif args.backbone in ("", "minilm"):
        backbone = ""
    else:
        backbone = args.backbone
    label = backbone_label(args.backbone)
    import torch

    device = args.device
    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    header = f"{os.cpu_count()} CPUs, torch threads {threads} per merchant process, device {device}" + (
        "" if torch.cuda.is_available() else " (no CUDA GPU on this machine: CPU only)"
    )
    print(f"scale benchmark: {header}; {load_text()}", flush=True)
    print(
        "plan: the run config's defaults (trainable=head, 10 local epochs on frozen features, batch 64, "
        "4 sessions per customer, max-length 48, feature cache on), rounds 0-2 per point\n",
        flush=True,
    )

    # ---- customers axis
    grid: list[tuple[str, str, int]] = [(backbone, label, n) for n in parse_sizes(args.customers)]
    if backbone != "":
        grid = [("", MINILM_LABEL, n) for n in parse_sizes(args.reference_customers)] + grid
    customers: list[dict[str, Any]] = []
    generated: dict[int, float] = {}
    failed: list[str] = []
    for bb, bb_label, n in grid:
        data = work / "data" / f"customers-{n}"
        if n not in generated:
            gen_spec = {"data": str(data), "base": n, "label": f"data {n}"}
            gen, _, why = run_worker("generate", gen_spec, work / "logs" / f"gen-{n}.log", args.timeout)
            if gen is None:
                failed.append(f"data for {fmt_n(n)} customers: {why}")
                continue
            generated[n] = gen["generate_s"]
        name = f"{'minilm' if bb == '' else 'small'}-{n}"
        state = work / "state" / name
        shutil.rmtree(state, ignore_errors=True)
        print(f"customers axis: {bb_label}, {fmt_n(n)} customers ...", flush=True)
        spec = {
            "backbone": bb,
            "label": bb_label,
            "base": n,
            "data": str(data),
            "state": str(state),
            "device": device,
            "run_id": f"scale-{name}",
            "threads": args.threads,
        }
        point, _, why = run_worker("customers", spec, work / "logs" / f"{name}.log", args.timeout)
        if point is None:
            failed.append(f"{bb_label}, {fmt_n(n)} customers: {why}")
            continue
        point["generate_s"] = generated[n]
        r = point["rounds"]
        print(
            f"  r0 {r[0]['wall_s']:.1f} s, r1 {r[1]['wall_s']:.1f} s, r2 {r[2]['wall_s']:.1f} s, "
            f"peak {point['peak_mib']:.0f} MiB ({load_text()})",
            flush=True,
        )
        customers.append(point)

    # ---- merchants axis
    merchants: list[dict[str, Any]] = []
    gpus = args.gpus_per_merchant
    if gpus is None:
        gpus = 0.25 if device.startswith("cuda") else 0.0
    for n in parse_sizes(args.merchants):
        print(f"merchants axis: {n} merchants × {args.merchant_customers} customers ...", flush=True)
        spec = {
            "merchants": n,
            "customers": args.merchant_customers,
            "backbone": backbone,
            "runs": str(work / "runs"),
            "sim_root": str(work / "sim" / f"merchants-{n}"),
            "cpus_per_merchant": args.cpus_per_merchant,
            "gpus_per_merchant": gpus,
            "label": f"{n} merchants",
        }
        shutil.rmtree(work / "runs" / f"merchants-{n}", ignore_errors=True)
        shutil.rmtree(work / "sim" / f"merchants-{n}", ignore_errors=True)
        env_device = os.environ.get("FEDBEHAVIOR_MERCHANT_DEVICE")
        if device != "auto":
            os.environ["FEDBEHAVIOR_MERCHANT_DEVICE"] = device  # the simulated merchants' setting
        try:
            point, memory, why = run_worker(
                "merchants", spec, work / "logs" / f"merchants-{n}.log", args.timeout, tree=True
            )
        finally:
            if env_device is None:
                os.environ.pop("FEDBEHAVIOR_MERCHANT_DEVICE", None)
            else:
                os.environ["FEDBEHAVIOR_MERCHANT_DEVICE"] = env_device
        if point is None or memory is None:
            failed.append(f"{n} merchants: {why}")
            continue
        point.update(
            peak_pss_mib=memory.peak_pss / 2**20,
            peak_rss_mib=memory.peak_rss / 2**20,
            processes=memory.peak_processes,
            label=label,
            cpus_per_merchant=args.cpus_per_merchant,
        )
        r = point["round_s"]
        print(
            f"  r0 {r[0]:.1f} s, r1 {r[1]:.1f} s, r2 {r[2]:.1f} s, total {point['total_s']:.1f} s, "
            f"peak {point['peak_pss_mib']:.0f} MiB PSS, {memory.peak_processes} processes ({load_text()})",
            flush=True,
        )
        merchants.append(point)
    return {"header": header, "customers": customers, "merchants": merchants, "failed": failed}


def report(results: dict[str, Any], out: Path) -> list[Path]:
    """Print the tables, how each cost grows and the slowest point; draw the PNGs into `out`."""
    customers, merchants, failed = results["customers"], results["merchants"], results["failed"]
    extrapolated = extrapolate_minilm(customers)
    print(f"\n{results.get('header', '')}")
    print("\n== Customers per merchant: one merchant's rounds through the training core (no Flower) ==")
    print("N: base_customers of the synthetic shop; customers: training + held-out; texts r1: the training")
    print("examples of round 1; gen s: generating the data (not in a round); r0: initial evaluation (the")
    print("process's model and data loads), r1: first train + evaluate (features computed), r2: a later")
    print("one (features cached); peak: the process's ru_maxrss; floor: after importing the libraries")
    if customers:
        print("\n".join(customers_table(customers)))
        print(
            "\nphases, seconds (exclusive; computed = texts the backbone ran on; peak: ru_maxrss after it):"
        )
        print("\n".join(phases_table(customers)))
        for p in customers:
            if p.get("cuda_peak_mib"):
                print(f"CUDA peak {p['label']} {fmt_n(p['base'])}: {p['cuda_peak_mib']:.0f} MiB")
    if merchants:
        m = merchants[0]
        print(
            f"\n== Merchants: `simulate` (Flower + Ray) with {m['customers']} customers each, "
            f"{m.get('label', '')}, {m.get('cpus_per_merchant', 1.0):g} CPU per merchant actor =="
        )
        print("r0-r2 from metrics.jsonl time_s; start+end: Ray start, actors, export, shutdown; agg: the")
        print("coordinator's screening + aggregation per round; PSS/RSS: peak sums over the process tree")
        print("\n".join(merchants_table(merchants)))
    print("\n== How each cost grows, and what dominates ==")
    for line in growth_lines(customers, merchants, extrapolated):
        print(f"- {line}")
    print(f"\nslowest point: {slowest(customers, merchants)}")
    if failed:
        print("not measured: " + "; ".join(failed))
    written = []
    if customers:
        plot_customers(customers, extrapolated, out / "scale-customers.png")
        written.append(out / "scale-customers.png")
    if merchants:
        plot_merchants(merchants, out / "scale-merchants.png")
        written.append(out / "scale-merchants.png")
    for path in written:
        print(f"wrote {path}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    if args.from_json is not None:  # the tables and figures of an earlier run, re-printed and redrawn
        results = json.loads(args.from_json.read_text(encoding="utf-8"))
        report(results, args.out.resolve())
        return 1 if results["failed"] else 0
    for key, value in (
        ("TOKENIZERS_PARALLELISM", "false"),
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("FLWR_TELEMETRY_ENABLED", "0"),
    ):
        os.environ.setdefault(key, value)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = measure(args, work)
    report(results, args.out.resolve())
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s; {load_text()}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
