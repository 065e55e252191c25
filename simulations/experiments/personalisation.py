"""Does personalisation help each merchant? Local-only vs global vs personalised, per merchant.

For every merchant folder (a `fedbehavior simulate` run's `<run>/merchants/merchant-i`, or the
folders `fedbehavior split-store` writes), runs `client.evaluation.personalise.personalise` on top of one
global model (a run's `final/` or an export) and prints one row per merchant with the held-out AUC and log
loss of its local-only baseline (counts logistic regression on its own training customers), the
global model, the fine-tuned model, and the model kept by the fallback rule, then the medians:

    python -m simulations.experiments.personalisation --run /tmp/p-runs/p1
    python -m simulations.experiments.personalisation --global runs/x/final --merchants m0 m1 m2

Each merchant's held-out customers are those of federated training (its own salt and split); the
personalised models go to `--out` (default `<run>/personalised`), a JSON line per merchant to
`<out>/results.jsonl`. Nothing here is DP towards the merchants' own customers (see the module's
docstring): it is the merchant's own, local measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from client.evaluation.fine_tune import TRAIN_MODES, PersonaliseSettings
from client.evaluation.personalise import (
    GLOBAL,
    KEPT,
    LOCAL,
    PERSONAL,
    personalise,
)
from shared.metrics import format_difference

COLUMNS = (LOCAL, GLOBAL, PERSONAL, KEPT)


def merchant_row(report: Any) -> dict[str, Any]:
    """One merchant's held-out figures; `kept` is the model the fallback rule chose."""
    held = {name: report.held_out[name] for name in (LOCAL, GLOBAL, PERSONAL)}
    held[KEPT] = report.held_out[report.chosen]
    return {
        "merchant": report.merchant_id,
        "customers": report.customers,
        "chosen": report.chosen,
        "best_epoch": report.best_epoch,
        **{f"{name}_auc": s.auc for name, s in held.items()},
        **{f"{name}_loss": s.loss for name, s in held.items()},
        # the local-only regression's AUC out of fold on every training customer: a steadier
        # estimate of what the merchant alone gets than its held-out AUC (5x the customers)
        "local_cv_auc": report.local_cross_validated.auc if report.local_cross_validated else None,
        # kept minus local-only held-out AUC, with its 95% paired bootstrap interval
        **{
            f"kept_gain_{part}": getattr(report.gain_over_local.get(KEPT), part, None)
            for part in ("estimate", "low", "high")
        },
    }


def medians(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in COLUMNS:
        for metric in ("auc", "loss"):
            values = [r[f"{name}_{metric}"] for r in rows if r[f"{name}_{metric}"] is not None]
            out[f"{name}_{metric}"] = statistics.median(values) if values else None
    return out


def _cell(value: float | None) -> str:
    return f"{value:6.3f}" if value is not None else "     -"


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'merchant':12}"
        + "".join(f"{name:>16}" for name in COLUMNS)
        + f"{'local 5-fold':>14}  {'kept − local [95%]':>24}  chosen"
    )
    sub = f"{'':12}" + "".join(f"{'AUC':>8}{'loss':>8}" for _ in COLUMNS) + f"{'AUC':>14}"
    lines = [header, sub]
    for r in rows:
        cells = "".join(f"  {_cell(r[f'{n}_auc'])}  {_cell(r[f'{n}_loss'])}" for n in COLUMNS)
        lines.append(
            f"{r['merchant']:12}{cells}  {'':6}{_cell(r['local_cv_auc'])}  {_gain(r):>24}  {r['chosen']}"
        )
    m = medians(rows)
    cv = [r["local_cv_auc"] for r in rows if r["local_cv_auc"] is not None]
    lines.append(
        f"{'median':12}"
        + "".join(f"  {_cell(m[f'{n}_auc'])}  {_cell(m[f'{n}_loss'])}" for n in COLUMNS)
        + f"  {'':6}{_cell(statistics.median(cv) if cv else None)}"
    )
    below = [r for r in rows if (r[f"{KEPT}_auc"] or 0.0) < (r[f"{LOCAL}_auc"] or 0.0)]
    if not below:
        lines.append("kept ≥ local-only (held-out AUC) at every merchant")
    else:
        lines.append(f"kept below local-only (held-out AUC) at: {', '.join(r['merchant'] for r in below)}")
        sure = [r["merchant"] for r in below if r["kept_gain_high"] is not None and r["kept_gain_high"] < 0]
        lines.append(
            f"  of which the 95% interval excludes 0 at: {', '.join(sure)}"
            if sure
            else "  at each the 95% interval holds 0: the held-out set cannot tell the two apart"
        )
    return "\n".join(lines)


def _gain(row: dict[str, Any]) -> str:
    if row["kept_gain_estimate"] is None:
        return "-"
    return format_difference(row["kept_gain_estimate"], row["kept_gain_low"], row["kept_gain_high"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="", help="a simulate run: <run>/merchants/* and <run>/final")
    parser.add_argument("--global", dest="global_folder", default="", help="a run's final/ or an export")
    parser.add_argument("--merchants", nargs="*", default=[], help="merchant folders (default: the run's)")
    parser.add_argument("--train", choices=TRAIN_MODES, default="head")
    parser.add_argument("--epochs", type=int, default=PersonaliseSettings().epochs)
    parser.add_argument("--learning-rate", type=float, default=PersonaliseSettings().learning_rate)
    parser.add_argument("--out", default="", help="where the personalised models go")
    args = parser.parse_args(argv)
    run = Path(args.run) if args.run else None
    folders = [Path(m) for m in args.merchants] or (
        sorted((run / "merchants").glob("merchant-*")) if run else []
    )
    global_folder = Path(args.global_folder) if args.global_folder else (run / "final" if run else None)
    if not folders or global_folder is None:
        parser.error("give --run <simulate run>, or --global <model folder> and --merchants <folders>")
    out = Path(args.out) if args.out else (run or Path(".")) / "personalised"
    settings = PersonaliseSettings(train=args.train, epochs=args.epochs, learning_rate=args.learning_rate)
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        report = personalise(folder, out=out / folder.name, global_folder=global_folder, settings=settings)
        print("\n".join(report.lines()), flush=True)
        rows.append(merchant_row(report))
    with (out / "results.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({**row, "train": args.train, "global": str(global_folder)}) + "\n")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
