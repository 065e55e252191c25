"""`fedbehavior report runs/<name>`: plots of a run and one self-contained HTML page for people.

Reads only the run folder (`metrics.jsonl`, `final/run-config.json`, `final/README.md`, through
`server.provenance`) and writes `report/`: one PNG per plot (matplotlib, Agg backend: no display
needed) and `index.html` with the same PNGs embedded as base64, so the page can be mailed on its own.
"""

from __future__ import annotations

import argparse
import base64
import html
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.provenance import NOT_REPORTED, PRIVACY_COLUMNS, privacy_record, read_rows, round_epsilon
from shared.trained import RUN_CONFIG_FILE, read_run_config

REPORT_DIR = "report"
QUALITY_KEYS = ("accuracy", "macro_f1", "auc", "top3_accuracy")
STATUS_COLORS = {
    "trained": "#2e7d32",
    "refused-budget": "#f9a825",
    "rejected-update": "#c62828",
    "failed": "#6d4c41",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: coordinators and CI have no display
    import matplotlib.pyplot as plt

    return plt


def _merchants(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({m for row in rows for m in row.get("merchants", {})})


def plot_metrics(rows: list[dict[str, Any]], ax: Any) -> None:
    """Global evaluation metrics per round (round 0 = the untrained adapter)."""
    rounds = [r["round"] for r in rows]
    for key in (*QUALITY_KEYS, "loss"):
        values = [r.get("global", {}).get(key) for r in rows]
        if any(v is not None for v in values):
            # error bars: how far the evaluation noise moves the metric (the coordinator's noise_sd)
            sd = [(r.get("global", {}).get("noise_sd") or {}).get(key) for r in rows]
            ax.errorbar(
                rounds,
                [float("nan") if v is None else v for v in values],
                yerr=[0.0 if e is None else e for e in sd],
                marker="o",
                capsize=3,
                label=key,
            )
    # pooled from noisy count histograms: with few held-out customers per merchant, mostly noise
    ax.set(xlabel="round", ylabel="value", title="Federated evaluation (held-out customers, noisy counts)")
    ax.legend()


def plot_epsilon(rows: list[dict[str, Any]], ax: Any) -> None:
    """Each merchant's epsilon after each round, with its budget when the merchant reported one
    (one dashed line per distinct budget, named after the merchants that share it)."""
    colors: dict[str, str] = {}
    sharing: dict[float, list[str]] = {}
    for name in _merchants(rows):
        points = [(r["round"], round_epsilon(r["merchants"][name])) for r in rows if name in r["merchants"]]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            colors[name] = ax.plot(*zip(*points, strict=True), marker="o", label=name)[0].get_color()
            budgets = [r["merchants"][name].get("max_epsilon") for r in rows if name in r["merchants"]]
            budget = next((b for b in reversed(budgets) if b is not None), None)
            if budget is not None:
                sharing.setdefault(float(budget), []).append(name)
    for budget, names in sharing.items():
        color = colors[names[0]] if len(names) == 1 else "grey"
        ax.axhline(budget, linestyle="--", color=color, label=f"{', '.join(names)} budget")
    ax.set(xlabel="round", ylabel="epsilon", title="Privacy spent per merchant")
    ax.legend()


def plot_participation(rows: list[dict[str, Any]], ax: Any) -> None:
    """How many merchants trained, were refused their budget, rejected or failed, per round."""
    trained_rows = [r for r in rows if r["round"] > 0]
    rounds = [r["round"] for r in trained_rows]
    counts = [Counter(m["status"] for m in r.get("merchants", {}).values()) for r in trained_rows]
    statuses = list(STATUS_COLORS) + sorted({s for c in counts for s in c} - set(STATUS_COLORS))
    bottom = [0] * len(rounds)
    for status in statuses:
        heights = [c.get(status, 0) for c in counts]
        ax.bar(rounds, heights, bottom=bottom, label=status, color=STATUS_COLORS.get(status))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set(xlabel="round", ylabel="merchants", title="Participation and status")
    ax.legend()


def plot_bytes(rows: list[dict[str, Any]], ax: Any) -> None:
    """Bytes each merchant sent up per round (stacked), and bytes down when the run recorded them."""
    trained_rows = [r for r in rows if r["round"] > 0]
    rounds = [r["round"] for r in trained_rows]
    bottom = [0.0] * len(rounds)
    for name in _merchants(trained_rows):
        heights = [float(r["merchants"].get(name, {}).get("bytes_up") or 0) / 1e6 for r in trained_rows]
        ax.bar(rounds, heights, bottom=bottom, label=f"{name} up")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    down = [r.get("bytes_down") for r in trained_rows]
    if any(d is not None for d in down):
        ax.plot(rounds, [float(d or 0) / 1e6 for d in down], "k--", marker="x", label="down (all)")
    ax.set(xlabel="round", ylabel="MB", title="Bytes per round")
    ax.legend()


PLOTS: dict[str, tuple[str, Callable[[list[dict[str, Any]], Any], None]]] = {
    "metrics.png": ("Global metrics per round", plot_metrics),
    "epsilon.png": ("Epsilon per merchant per round", plot_epsilon),
    "participation.png": ("Participation and status per round", plot_participation),
    "bytes.png": ("Bytes up per round", plot_bytes),
}


def _table(header: list[str], body: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in body
    )
    return f"<table><tr>{head}</tr>{cells}</table>"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _dp_section(record: dict[str, Any]) -> str:
    merchants = [[name, *(m[c] for c in PRIVACY_COLUMNS)] for name, m in record["merchants"].items()]
    settings = [
        ["mechanism", record["mechanism"]],
        ["clipping norm", f"{_fmt(record['clipping_norm'])} ({record['clipping_norm_source']})"],
        ["rounds", f"{record['rounds']['completed']} completed of {record['rounds']['planned']} planned"],
        ["task", f"{record['task']['name']}: {', '.join(record['task']['labels'])}"],
    ]
    not_covered = "".join(f"<li>{html.escape(x)}</li>" for x in record["not_covered"])
    return (
        "<h2>DP settings</h2>"
        + _table(["setting", "value"], settings)
        + _table(["merchant", *(c.replace("_", " ") for c in PRIVACY_COLUMNS)], merchants)
        + f"<p>&ldquo;{html.escape(NOT_REPORTED)}&rdquo;: the run folder does not hold that value.</p>"
        + f"<p>Not covered by the guarantee:</p><ul>{not_covered}</ul>"
    )


STYLE = (
    "body{font-family:sans-serif;max-width:1160px;margin:1em auto}img{max-width:100%}"
    ".plot{display:inline-block;width:49%;vertical-align:top}h2{font-size:17px}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;font-size:14px}"
)


def build_report(run_dir: Path) -> Path:
    """Write `run_dir/report/` (PNGs + index.html) and return the path of index.html."""
    run_dir = Path(run_dir)
    rows = sorted(read_rows(run_dir), key=lambda r: r["round"])
    final = run_dir / "final"
    cfg = read_run_config(final) if (final / RUN_CONFIG_FILE).exists() else None
    record = privacy_record(run_dir, cfg)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figures = []
    for name, (title, draw) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(8, 4.2))
        draw(rows, ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        figures.append(
            f'<div class="plot"><h2>{html.escape(title)}</h2>'
            f'<img alt="{name}" src="data:image/png;base64,{data}"></div>'
        )
    index = out / "index.html"
    index.write_text(_page(record, figures), encoding="utf-8")
    return index


def _page(record: dict[str, Any], figures: list[str]) -> str:
    """The HTML page: a summary line, the embedded plots, the DP settings."""
    run = html.escape(record["run"])
    metrics = record["metrics"]
    scalars = {k: v for k, v in metrics["values"].items() if not isinstance(v, dict)}
    summary = ", ".join(f"{html.escape(k)} {_fmt(v)}" for k, v in scalars.items())
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>fedbehavior run {run}</title>"
        f"<style>{STYLE}</style></head><body><h1>Run {run}</h1>"
        f"<p>Last round {metrics['round']}: {summary}. "
        f"Evaluation set: {html.escape(metrics['evaluation_set'])}.</p>"
        + "".join(figures)
        + _dp_section(record)
        + "</body></html>\n"
    )


TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_HINT = "pip install 'fedbehavior[tensorboard]'"


class MissingExtraError(RuntimeError):
    """An optional feature whose package is not installed; the message names the extra to install."""


def tensorboard_scalars(rows: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """(tag, value, round) for every scalar TensorBoard shows: `global/<metric>` per round,
    `epsilon/<merchant>` and `bytes_up/<merchant>` (plus `bytes_up/total`, and `bytes_down/total`
    when recorded) per training round. Nulls (a metric the noise made undefined) are left out."""
    out: list[tuple[str, float, int]] = []
    for row in rows:
        step = int(row["round"])
        for key, value in row.get("global", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append((f"global/{key}", float(value), step))
        merchants = row.get("merchants", {})
        for name, entry in sorted(merchants.items()):
            if (epsilon := round_epsilon(entry)) is not None:
                out.append((f"epsilon/{name}", float(epsilon), step))
        if step == 0:
            continue  # round 0 only evaluates: nothing went up
        sent = {name: entry.get("bytes_up") for name, entry in sorted(merchants.items())}
        out += [(f"bytes_up/{name}", float(b), step) for name, b in sent.items() if b is not None]
        out.append(("bytes_up/total", float(sum(b or 0 for b in sent.values())), step))
        if row.get("bytes_down") is not None:
            out.append(("bytes_down/total", float(row["bytes_down"]), step))
    return out


def write_tensorboard(run_dir: Path) -> Path:
    """Write the run's scalars (`tensorboard_scalars`) to `run_dir/report/tensorboard/`, replacing
    the event files an earlier call wrote there; return that folder (`tensorboard --logdir` it)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        message = f"TensorBoard scalars need the tensorboard package: {TENSORBOARD_HINT}"
        raise MissingExtraError(message) from err
    run_dir = Path(run_dir)
    rows = sorted(read_rows(run_dir), key=lambda r: r["round"])
    folder = run_dir / REPORT_DIR / TENSORBOARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("events.out.tfevents.*"):  # a second call would otherwise show every point twice
        old.unlink()
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for tag, value, step in tensorboard_scalars(rows):
            writer.add_scalar(tag, value, global_step=step)
    finally:
        writer.close()
    return folder


def cmd_report(args: argparse.Namespace) -> int:
    """`fedbehavior report`: build the report (and TensorBoard scalars) and print where they are."""
    if args.tensorboard:  # first: a missing extra fails before minutes of plotting
        print(f"tensorboard: {write_tensorboard(Path(args.run_dir))}  (tensorboard --logdir <that folder>)")
    print(f"report: {build_report(Path(args.run_dir))}")
    return 0


def add_report_cli(subparsers: Any) -> None:
    """Register `report` on the top-level subparsers."""
    parser = subparsers.add_parser("report", help="plots and an HTML page of a run (runs/<name>/report/)")
    parser.add_argument("run_dir", help="the run folder, runs/<name>")
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help=f"also write TensorBoard scalars to runs/<name>/report/{TENSORBOARD_DIR}/ ({TENSORBOARD_HINT})",
    )
    parser.set_defaults(func=cmd_report)
