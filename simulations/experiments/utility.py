"""The privacy–utility study: does joining the federation beat what a merchant builds alone?

For one dataset (an ingested store, or the synthetic generator), split into merchants by customer
hash, every arm is scored on the SAME held-out customers (the union of each merchant's held-out set,
with the task, split and salts of a real run), by exact pooled AUC and log loss (a researcher's view;
merchants themselves release only noisy histograms):

- `local-lr`: each merchant's own non-private logistic regression on event-name counts, trained on
  its training customers (every example), scored on its held-out customers; pooled and per merchant;
- `local-lora`: each merchant's own non-private LoRA + head on its training customers alone (the
  `central-lora` plan on one merchant's data), scored on its held-out customers; pooled and per merchant;
- `central-lr`: the same regression on all merchants' training data pooled (non-private);
- `central-lora`: non-private LoRA + head on the pooled training data, whatever `trainable` says (the
  upper bound a merchant cannot have);
- `central-dp`: the run config's model (`trainable`) on the pooled data with customer-level DP at the
  arm's ε (one data owner);
- `fed-eps<ε>` / `fed-nodp`: the federated run in process (`simulations.inprocess`: the real ClientApp,
  ledger, DP-SGD and aggregation), each merchant with budget ε; the final adapter is scored.

    python -m simulations.experiments.utility --data /work/data/ret --merchants 5 \\
        --arms local-lr,central-lr,central-lora,fed-eps8 --out runs/study-ret

Prints one JSON line per arm and writes `<out>/results.jsonl`. `--set key=value` overrides the run
config (as `fedbehavior simulate --set`), so every default is tried the way a user would run it.
Texts are padded to `max-length`: on the clickstream the longest text is 24 tokens, so
`--set max-length=24` gives the same model at half the cost of the default 48.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.ingest.data import Encoder, MerchantData, load_events
from client.training.loop import DPSettings, StepPlan, TrainSettings, customer_groups, predict, train_dp
from server.coordinator import NoMerchantTrainedError
from shared.adapters import load_adapter
from shared.config import RunConfig, parse_sets
from shared.model import build_model, load_tokenizer, resolve_backbone
from shared.privacy.calibration import calibrate_noise
from shared.tasks import Candidate, stable_hash, up_to_k_per_customer
from simulations.inprocess import run_in_process
from simulations.split import split_store

log = logging.getLogger(__name__)
EVAL_FRACTION = 0.2  # MerchantSettings' default: the held-out share of customers
DELTA = 1e-6


@dataclass
class Merchant:
    name: str
    data: MerchantData

    def train_examples(self) -> list[Candidate]:
        return [c for cs in self.data.train_candidates.values() for c in cs]


def load_merchants(
    folders: list[Path], cfg: RunConfig, scratch: Path, train_caps: list[int] | None = None
) -> list[Merchant]:
    """Each folder's task data; `train_caps[i]` keeps only that many of merchant i's training
    customers (chosen by customer hash; held-out customers unchanged), to study small merchants on
    the same evaluation set."""
    if train_caps is not None and len(train_caps) != len(folders):
        raise SystemExit(f"--train-caps names {len(train_caps)} merchants, the study has {len(folders)}")
    out = []
    for i, folder in enumerate(folders):
        events, report = load_events(folder, scratch / folder.name)
        data = MerchantData.build(
            events,
            cfg.task_spec,
            eval_fraction=EVAL_FRACTION,
            salt=folder.name,
            report=report,
            split=cfg.eval_split,
            cutoff=cfg.eval_cutoff_time,
        )
        if train_caps is not None:
            keep = sorted(data.train_candidates, key=lambda c: stable_hash("cap", c))[: train_caps[i]]
            data.train_candidates = {c: data.train_candidates[c] for c in sorted(keep)}
        out.append(Merchant(folder.name, data))
    return out


# ---------------------------------------------------------------- scores


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return math.nan
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(values):  # average ranks over ties
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def log_loss(labels: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def summary(per_merchant: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    labels = np.concatenate([y for y, _ in per_merchant.values()])
    scores = np.concatenate([s for _, s in per_merchant.values()])
    aucs = {m: auc(y, s) for m, (y, s) in per_merchant.items()}
    return {
        "auc": round(auc(labels, scores), 4),
        "loss": round(log_loss(labels, scores), 4),
        "median_merchant_auc": round(float(np.nanmedian(list(aucs.values()))), 4),
        "merchant_auc": {m: round(a, 4) for m, a in aucs.items()},
        "examples": len(labels),
    }


# ---------------------------------------------------------------- count regression


def _counts(candidates: list[Candidate], vocab: dict[str, int]) -> np.ndarray:
    x = np.zeros((len(candidates), len(vocab) + 1))
    for i, c in enumerate(candidates):
        for name, n in Counter(e.event_name or e.behavior.value for e in c.prefix).items():
            if name in vocab:
                x[i, vocab[name]] = n
        x[i, -1] = len(c.prefix)
    return np.log1p(x)


def fit_lr(train: list[Candidate]) -> tuple[Any, dict[str, int]]:
    from sklearn.linear_model import LogisticRegression

    vocab = {
        n: i
        for i, n in enumerate(sorted({e.event_name or e.behavior.value for c in train for e in c.prefix}))
    }
    y = np.array([c.label for c in train])
    model = LogisticRegression(C=1.0, max_iter=2000)
    if len(set(y)) < 2:
        return None, vocab
    model.fit(_counts(train, vocab), y)
    return model, vocab


def lr_scores(model: Any, vocab: dict[str, int], held: list[Candidate], base: float) -> np.ndarray:
    if model is None:
        return np.full(len(held), base)
    return model.predict_proba(_counts(held, vocab))[:, 1]


def arm_local_lr(merchants: list[Merchant]) -> dict[str, Any]:
    out = {}
    for m in merchants:
        train, held = m.train_examples(), m.data.evaluation()
        model, vocab = fit_lr(train)
        base = float(np.mean([c.label for c in train]))
        out[m.name] = (np.array([c.label for c in held]), lr_scores(model, vocab, held, base))
    return summary(out)


def arm_central_lr(merchants: list[Merchant]) -> dict[str, Any]:
    train = [c for m in merchants for c in m.train_examples()]
    model, vocab = fit_lr(train)
    base = float(np.mean([c.label for c in train]))
    return summary(
        {
            m.name: (
                np.array([c.label for c in m.data.evaluation()]),
                lr_scores(model, vocab, m.data.evaluation(), base),
            )
            for m in merchants
        }
    )


# ---------------------------------------------------------------- the text model


def held_out_scores(
    model: torch.nn.Module, encoder: Encoder, merchants: list[Merchant]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each merchant's held-out labels and the model's purchase probabilities."""
    out = {}
    for m in merchants:
        held = m.data.evaluation()
        probs, _ = predict(model, encoder.encode(held), batch_size=128, device=torch.device("cpu"))
        out[m.name] = (np.array([c.label for c in held]), probs[:, 1])
    return out


def score_model(model: torch.nn.Module, encoder: Encoder, merchants: list[Merchant]) -> dict[str, Any]:
    return summary(held_out_scores(model, encoder, merchants))


def study_model(cfg: RunConfig) -> torch.nn.Module:
    """The run config's model (backbone, LoRA, pooling, seeded init), as every arm builds it."""
    return build_model(
        cfg.backbone,
        num_labels=cfg.task_spec.num_labels,
        lora=cfg.lora,
        init_seed=cfg.seed,
        pooling=cfg.pooling,
    )


def arm_central(
    merchants: list[Merchant], cfg: RunConfig, encoder: Encoder, epsilon: float | None
) -> dict[str, Any]:
    """LoRA on the pooled training data, as one data owner would train it, on the federation's plan:
    `num-rounds` rounds of `local-epochs` epochs, each round on that round's up-to-k sessions of every
    customer (so every customer is seen as often as in the federated run), with customer-level DP at
    `epsilon` calibrated for the whole plan, or non-private (no noise, no clipping)."""
    model, sigma = train_pooled(merchants, cfg, encoder, epsilon)
    result = score_model(model, encoder, merchants)
    result["noise_multiplier"] = round(sigma, 4)
    return result


def arm_local_lora(merchants: list[Merchant], cfg: RunConfig, encoder: Encoder) -> dict[str, Any]:
    """Each merchant alone with the text model: non-private LoRA + head on its own training customers
    only (the central arm's plan on one merchant's data), scored on its own held-out customers. What a
    merchant could build with this project's model without joining."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for m in merchants:
        model, _ = train_pooled([m], cfg, encoder, None)
        out.update(held_out_scores(model, encoder, [m]))
    return summary(out)


def train_pooled(
    merchants: list[Merchant], cfg: RunConfig, encoder: Encoder, epsilon: float | None
) -> tuple[torch.nn.Module, float]:
    """The run config's model trained on these merchants' training data pooled (see `arm_central`);
    returns it and the noise multiplier (0 when non-private)."""
    model = study_model(cfg)
    settings = TrainSettings(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lora_learning_rate=cfg.lora_learning_rate or None,
    )
    sigma = 0.0
    for r in range(cfg.num_rounds):
        chosen = [
            c
            for m in merchants
            for c in up_to_k_per_customer(
                m.data.train_candidates,
                m.data.train_customers,
                k=cfg.examples_per_customer,
                round_seed=f"c{r}",
            )
        ]
        groups = customer_groups([c.customer_id for c in chosen])
        plan = StepPlan.of(int(groups.max()) + 1, cfg.batch_size, cfg.epochs)
        if epsilon is not None and r == 0:  # the same customers every round: one calibration
            sigma = calibrate_noise(
                spent=[],
                sample_rate=plan.sample_rate,
                steps_per_round=plan.steps,
                rounds=cfg.num_rounds,
                max_epsilon=epsilon,
                delta=DELTA,
            )
        clip = cfg.max_grad_norm if epsilon is not None else 1e6
        train_dp(
            model,
            encoder.encode(chosen),
            settings=settings,
            dp=DPSettings(noise_multiplier=sigma, max_grad_norm=clip),
            device=torch.device("cpu"),
            groups=groups,
        )
    return model, sigma


def arm_federated(
    folders: list[Path],
    merchants: list[Merchant],
    cfg: RunConfig,
    encoder: Encoder,
    epsilon: float,
    out: Path,
    name: str,
) -> dict[str, Any]:
    """The real federated run (fresh merchant folders: every run spends its merchants' budgets)."""
    root = out / name / "merchants"
    shutil.rmtree(out / name, ignore_errors=True)
    copies = []
    for folder in folders:
        target = root / folder.name
        # a fresh ledger, the data as it is (a synthetic shop's events are events.jsonl: keep them)
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns("state"))
        meta = json.loads((target / "merchant.json").read_text())
        # the study owns these merchants: their policy admits the study's backbone
        meta.update(max_epsilon=epsilon, delta=DELTA, policy={"backbones": ["", cfg.backbone]})
        (target / "merchant.json").write_text(json.dumps(meta))
        copies.append(target)
    try:
        run_dir = run_in_process(cfg, copies, out / name / "run")
    except NoMerchantTrainedError as err:  # every merchant refused: e.g. ε too small for the plan
        held = sum(len(m.data.evaluation()) for m in merchants)
        return {"auc": math.nan, "loss": math.nan, "examples": held, "refused": str(err)}
    from safetensors.torch import load_file

    final = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))[-1]
    model = study_model(cfg)
    load_adapter(model, load_file(str(final)))
    result = score_model(model, encoder, merchants)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result["rounds"] = [
        {"round": r["round"], "statuses": sorted({v["status"] for v in r["merchants"].values()})}
        for r in rows
    ]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="an ingested folder (store/), or 'synthetic'")
    parser.add_argument("--merchants", type=int, default=5)
    parser.add_argument("--arms", default="local-lr,central-lr,central-lora,fed-eps8")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--train-caps", type=parse_caps, default=None, help=CAPS_HELP)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if not known_arm(a)]
    if unknown:
        raise SystemExit(
            f"unknown arm(s) {', '.join(unknown)}: choose from local-lr, local-lora, central-lr, "
            "central-lora, central-dp<ε>, fed-eps<ε>, fed-nodp (e.g. --arms local-lr,fed-eps8)"
        )
    cfg = RunConfig.parse({"backbone": resolve_backbone(""), **parse_sets(args.set)})
    args.out.mkdir(parents=True, exist_ok=True)
    folders = prepare(args.data, args.merchants, args.out, cfg)
    merchants = load_merchants(folders, cfg, args.out / "scratch", args.train_caps)
    if args.train_caps is not None:
        folders = [capped_folder(f, m, args.out / "capped") for f, m in zip(folders, merchants, strict=True)]
    encoder = Encoder(load_tokenizer(cfg.backbone), cfg.max_length)
    base = float(np.mean([c.label for m in merchants for c in m.train_examples()]))
    held = np.concatenate([[c.label for c in m.data.evaluation()] for m in merchants])
    header = {
        "data": args.data,
        "merchants": {m.name: (len(m.data.train_customers), len(m.data.eval_customers)) for m in merchants},
        "positive_rate": round(base, 4),
        "constant_loss": round(log_loss(held, np.full(len(held), base)), 4),
        "config": {k: v for k, v in cfg.to_record().items() if k not in ("backbone",)},
    }
    print(json.dumps(header), flush=True)
    with (args.out / "results.jsonl").open("a") as sink:
        sink.write(json.dumps({"header": header}) + "\n")
        for arm in arms:
            t0 = time.monotonic()
            result = run_arm(arm, folders, merchants, cfg, encoder, args.out)
            result.update(arm=arm, epsilon=arm_epsilon(arm), seconds=round(time.monotonic() - t0, 1))
            print(json.dumps(result), flush=True)
            sink.write(json.dumps(result) + "\n")
            sink.flush()
    return 0


CAPS_HELP = (
    "comma-separated, one per merchant: keep at most that many training customers (held-out "
    "customers unchanged), e.g. 25,60,100,140,171 for merchants as small as the held-back clickstream's"
)


def parse_caps(text: str) -> list[int]:
    try:
        caps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers such as 25,60,100") from None
    if not caps or min(caps) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every cap must be a positive integer")
    return caps


def capped_folder(folder: Path, merchant: Merchant, root: Path) -> Path:
    """A copy of `folder` holding only the customers `merchant` kept (training and held-out), for
    the federated arms, which read folders."""
    import pyarrow.parquet as pq

    keep = set(merchant.data.train_candidates) | set(merchant.data.eval_candidates)
    target = root / folder.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("state", "store"))
    (target / "store").mkdir()
    for part in sorted((folder / "store").glob("*.parquet")):
        table = pq.read_table(part)
        mask = [c in keep for c in table["customer_id"].to_pylist()]
        pq.write_table(table.filter(mask), target / "store" / part.name)
    return target


def known_arm(arm: str) -> bool:
    if arm in ("local-lr", "local-lora", "central-lr", "central-lora", "fed-nodp"):
        return True
    for prefix in ("fed-eps", "central-dp"):
        if arm.startswith(prefix):
            try:
                return float(arm.removeprefix(prefix)) > 0
            except ValueError:
                return False
    return False


def arm_epsilon(arm: str) -> float | None:
    """The per-merchant ε an arm runs at; None for a non-private arm."""
    for prefix in ("fed-eps", "central-dp"):
        if arm.startswith(prefix):
            return float(arm.removeprefix(prefix))
    return None


def run_arm(
    arm: str, folders: list[Path], merchants: list[Merchant], cfg: RunConfig, encoder: Encoder, out: Path
) -> dict[str, Any]:
    if arm == "local-lr":
        return arm_local_lr(merchants)
    if arm == "central-lr":
        return arm_central_lr(merchants)
    lora = cfg.model_copy(update={"trainable": "lora+head"})  # whatever the run trains
    if arm == "central-lora":  # the bound a merchant cannot reach
        return arm_central(merchants, lora, encoder, None)
    if arm == "local-lora":  # what a merchant can reach alone with the text model
        return arm_local_lora(merchants, lora, encoder)
    if arm.startswith("central-dp"):
        return arm_central(merchants, cfg, encoder, float(arm.removeprefix("central-dp")))
    if arm == "fed-nodp":
        return arm_federated(folders, merchants, cfg, encoder, 1e6, out, arm)
    if arm.startswith("fed-eps"):
        return arm_federated(folders, merchants, cfg, encoder, float(arm.removeprefix("fed-eps")), out, arm)
    raise ValueError(f"unknown arm {arm!r}")


def prepare(data: str, merchants: int, out: Path, cfg: RunConfig) -> list[Path]:
    """Merchant folders: split from an ingested store by customer hash, or synthetic non-IID shops
    (the run config's `sim-seed` and `sim-customers`, as `fedbehavior simulate` generates them)."""
    root = out / "merchants"
    if data == "synthetic":
        from simulations.synthetic import ensure_merchant

        return [
            ensure_merchant(cfg.sim_seed, i, root / f"merchant-{i}", base_customers=cfg.sim_customers)
            for i in range(merchants)
        ]
    if not (Path(data) / "store").is_dir():
        raise SystemExit(
            f"--data {data}: no store/ folder there; pass the folder `fedbehavior merchant ingest --out` "
            "wrote (it holds store/), or 'synthetic'"
        )
    return split_store(Path(data), root, merchants=merchants)


if __name__ == "__main__":
    raise SystemExit(main())
