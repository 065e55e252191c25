"""Pooled AUC against ε, drawn from the study's `results.jsonl` files (utility.py and head_sweep.py).

Each file holds `{"header": …}` lines (dataset, run config) followed by one JSON object per arm.
Private arms are points at their ε (`epsilon`), non-private runs of the same family (`fed-nodp`,
head-sweep at ε = ∞) a point at the right-hand "no DP" position, and the baselines a merchant can
have without joining (`local-lr`, its median merchant) or cannot have (`central-lora`, `central-lr`)
horizontal lines in the dataset's colour (`--lines` picks which).

    python -m simulations.experiments.plot /work/study/*/results.jsonl --out docs/utility-eps.png \\
        --rename ret=clickstream
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASELINES = {
    "local-lr": "local-only LR (pooled)",
    "local-lora": "local-only LoRA (pooled)",
    "central-lr": "central LR",
    "central-lora": "central LoRA, non-private",
}


@dataclass
class Series:
    """One family of private runs on one dataset: ε → pooled AUC (math.inf = no DP)."""

    dataset: str
    family: str
    points: dict[float, float] = field(default_factory=dict)


@dataclass
class Study:
    series: dict[tuple[str, str], Series] = field(default_factory=dict)
    baselines: dict[tuple[str, str], float] = field(default_factory=dict)


def dataset_name(header: dict[str, Any]) -> str:
    """ "synthetic" or the ingested folder's name (…/ret → ret)."""
    data = str(header.get("data", "?"))
    return data if data == "synthetic" else Path(data).name


def family(row: dict[str, Any], config: dict[str, Any]) -> str | None:
    """The private-run family an arm belongs to, or None for a baseline / unknown arm."""
    arm = str(row.get("arm", ""))
    mode = "head" if config.get("trainable") == "head" else "LoRA+head"
    if config.get("trainable") != "head" and config.get("lora-mode") == "ffa":
        mode = "FFA-LoRA+head"
    if arm.startswith("fed-"):
        return f"federated {mode}"
    if arm.startswith("central-dp"):
        return f"central DP {mode}"
    if arm.startswith("head-sweep"):
        return "federated head (sweep)"
    return None


def row_epsilon(row: dict[str, Any]) -> float:
    """The arm's ε; math.inf for a non-private run (fed-nodp, or an ε ≥ 1e5 meaning no noise)."""
    eps = row.get("epsilon")
    if eps is None:
        arm = str(row.get("arm", ""))
        if arm.endswith("nodp"):
            return math.inf
        for prefix in ("fed-eps", "central-dp", "head-sweep-eps"):
            if arm.startswith(prefix):
                eps = float(arm.removeprefix(prefix))
                break
        else:
            raise ValueError(f"arm {arm!r} has no epsilon field and no ε in its name")
    eps = float(eps)
    return math.inf if eps >= 1e5 else eps


def read(paths: list[Path]) -> Study:
    """Every arm of every file; a later line for the same (dataset, family, ε) replaces an earlier."""
    study = Study()
    for path in paths:
        header: dict[str, Any] = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not JSON ({err}): one JSON object a line expected") from None
            if "header" in row:
                header = row["header"]
                continue
            if "auc" not in row or not isinstance(row["auc"], (int, float)) or math.isnan(row["auc"]):
                continue
            name = dataset_name(header)
            arm = str(row.get("arm", ""))
            if arm in BASELINES:
                study.baselines[(name, arm)] = float(row["auc"])
                if arm == "local-lr" and "median_merchant_auc" in row:
                    study.baselines[(name, "local-lr-median")] = float(row["median_merchant_auc"])
                continue
            fam = family(row, header.get("config", {}))
            if fam is None:
                continue
            series = study.series.setdefault((name, fam), Series(name, fam))
            series.points[row_epsilon(row)] = float(row["auc"])
    return study


def draw(study: Study, out: Path, lines: tuple[str, ...] = ("local-lr-median", "central-lora")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not study.series and not study.baselines:
        raise ValueError("no arms with an AUC in the given results files: nothing to plot")
    finite = [e for s in study.series.values() for e in s.points if math.isfinite(e)] or [1.0, 8.0]
    lo, hi = min(finite), max(finite)
    nodp_x = hi * 2.5  # where ε = ∞ is drawn, on the log axis
    datasets = sorted({d for d, _ in study.series} | {d for d, _ in study.baselines})
    colours = dict(zip(datasets, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    markers = ["o", "s", "^", "D", "v", "P"]
    fig, ax = plt.subplots(figsize=(8, 5))
    families = sorted({f for _, f in study.series})
    for (dataset, fam), series in sorted(study.series.items()):
        xs = sorted(series.points)
        ax.plot(
            [x if math.isfinite(x) else nodp_x for x in xs],
            [series.points[x] for x in xs],
            marker=markers[families.index(fam) % len(markers)],
            color=colours[dataset],
            label=f"{dataset}: {fam}",
        )
    styles = {"local-lr-median": ":", "local-lr": "-.", "central-lr": (0, (1, 3)), "central-lora": "--"}
    names = {**BASELINES, "local-lr-median": "local-only LR, median merchant"}
    for (dataset, arm), value in sorted(study.baselines.items()):
        if arm not in lines:
            continue
        ax.axhline(
            value, color=colours[dataset], linestyle=styles[arm], alpha=0.7, label=f"{dataset}: {names[arm]}"
        )
    ax.set_xscale("log")
    ticks = sorted({*finite, nodp_x})
    ax.set_xticks(ticks)
    ax.set_xticklabels(["no DP" if t == nodp_x else f"{t:g}" for t in ticks])
    ax.set_xlim(lo / 1.5, nodp_x * 1.5)
    ax.set_xlabel("ε per merchant (δ = 1e-6, customer-level)")
    ax.set_ylabel("pooled AUC on held-out customers")
    ax.set_title("purchase-intent: privacy–utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", type=Path, help="results.jsonl files")
    parser.add_argument("--out", type=Path, default=Path("docs/utility-eps.png"))
    parser.add_argument(
        "--lines",
        default="local-lr-median,central-lora",
        help="baselines drawn as lines: local-lr-median, local-lr, central-lr, central-lora",
    )
    parser.add_argument("--rename", default="", help="dataset display names, e.g. ret=clickstream")
    args = parser.parse_args(argv)
    lines = tuple(x.strip() for x in args.lines.split(",") if x.strip())
    unknown = [x for x in lines if x not in (*BASELINES, "local-lr-median")]
    if unknown:
        raise SystemExit(
            f"--lines: unknown baseline(s) {', '.join(unknown)}; choose from local-lr-median, "
            f"{', '.join(BASELINES)}"
        )
    try:
        rename = dict(x.split("=", 1) for x in args.rename.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"--rename expects old=new pairs, got {args.rename!r}") from None
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        raise SystemExit(
            f"no such results file: {', '.join(missing)} (utility.py --out DIR writes DIR/results.jsonl)"
        )
    study = read(args.results)
    study = Study(
        {(rename.get(d, d), f): Series(rename.get(d, d), f, s.points) for (d, f), s in study.series.items()},
        {(rename.get(d, d), a): v for (d, a), v in study.baselines.items()},
    )
    draw(study, args.out, lines)
    summary: dict[str, Any] = defaultdict(dict)
    for (dataset, fam), series in study.series.items():
        summary[dataset][fam] = {("inf" if math.isinf(k) else k): v for k, v in sorted(series.points.items())}
    for (dataset, arm), value in study.baselines.items():
        summary[dataset][arm] = value
    print(json.dumps({"plot": str(args.out), **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
