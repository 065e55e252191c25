"""`fedbehavior report runs/<name>`: plots of a run and one self-contained HTML page for people.

Reads only the run folder's data (`metrics.jsonl`, `final/run-config.json` and a simulation's
`exact-metrics.jsonl`, through `server.provenance`) and writes `report/`: one PNG per plot
(matplotlib, Agg backend: no display needed) and `index.html` with the same PNGs embedded as base64,
so the page can be mailed on its own.

The federated metrics come from the merchants' noisy counts: each is drawn on its own axis with its
95% noise band (`shared.noise_bands`), and a value the noise swamps is marked unreadable rather than
plotted as a result. A simulation's exact pooled metrics (its research view) are drawn on the same
axes when the run folder has them.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.metrics import describe_metrics, row_bands
from server.provenance import privacy_record, read_exact, read_rows, release_description, round_epsilon
from shared.model_card import NOT_REPORTED, PRIVACY_COLUMNS
from shared.noise_bands import LABELS, RANGES, Z95, Band, describe
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


METRIC_AXES = ("accuracy", "macro_f1", "auc", "top3_accuracy", "loss")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")


def plot_metrics(
    rows: list[dict[str, Any]], fig: Any, exact: list[dict[str, Any]] | None = None
) -> list[Any]:
    """The federated metrics per round (round 0 = the untrained adapter), each on its own axis: the
    value from the pooled noisy counts with its 95% noise band, unreadable rounds marked as such, and
    the exact pooled value of a simulation (`exact`) when given. Returns the axes drawn."""
    keys = [
        k
        for k in METRIC_AXES
        if any(r.get("global", {}).get(k) is not None for r in rows)
        or any((row_bands(r.get("global", {})) or {}).get(k) for r in rows)
        or any(k in e.get("model", {}) for e in exact or [])
    ]
    if not keys:
        ax = fig.add_subplot(1, 1, 1)
        ax.set(title="No federated evaluation in metrics.jsonl")
        return [ax]
    columns = 2 if len(keys) > 1 else 1
    nrows = (len(keys) + columns - 1) // columns
    axes = [fig.add_subplot(nrows, columns, i + 1) for i in range(len(keys))]
    for key, ax in zip(keys, axes, strict=True):
        _plot_metric(rows, key, ax, exact or [])
    return axes


def _plot_metric(rows: list[dict[str, Any]], key: str, ax: Any, exact: list[dict[str, Any]]) -> None:
    rounds = [row["round"] for row in rows]
    values = [row.get("global", {}).get(key) for row in rows]
    bands = [(row_bands(row.get("global", {})) or {}).get(key) for row in rows]
    exact_points = [(e["round"], e["model"][key]) for e in exact if key in e.get("model", {})]
    readable = [
        (r, v, b)
        for r, v, b in zip(rounds, values, bands, strict=True)
        if v is not None and (b is None or (b.readable and b.sd is not None))
    ]
    bottom, top = RANGES.get(key, (0.0, 1.0))
    if not math.isfinite(top):  # the loss: scale to what is worth seeing, not to the noise
        seen = [v for _, v, _ in readable] + [v for _, v in exact_points]
        seen += [b.high for _, _, b in readable if b is not None]
        top = max(seen, default=1.0) * 1.15 or 1.0
    banded = [(r, b) for r, b in zip(rounds, bands, strict=True) if b is not None]
    if banded:
        ax.fill_between(
            [r for r, _ in banded],
            [max(bottom, min(b.low, top)) for _, b in banded],
            [min(b.high, top) for _, b in banded],
            color="tab:blue",
            alpha=0.15,
            label="95% noise band",
        )
    if readable:
        ax.errorbar(
            [r for r, _, _ in readable],
            [v for _, v, _ in readable],
            yerr=[Z95 * b.sd if b is not None and b.sd is not None else 0.0 for _, _, b in readable],
            marker="o",
            color="tab:blue",
            capsize=3,
            label="federated (noisy counts)",
        )
    unreadable = [r for r, b in zip(rounds, bands, strict=True) if b is not None and not b.readable]
    if unreadable:  # on the bottom edge, never at a height one could read as a value
        edge = ax.get_xaxis_transform()  # x in rounds, y in axes fractions
        ax.plot(
            unreadable,
            [0.04] * len(unreadable),
            "x",
            color="dimgrey",
            markersize=8,
            transform=edge,
            label="unreadable: the noise swamps it",
        )
    if exact_points:
        ax.plot(*zip(*exact_points, strict=True), "k--", marker="s", label="exact (simulation only)")
    ax.set_ylim(bottom, top)
    ax.set(xlabel="round", ylabel=LABELS.get(key, key), title=LABELS.get(key, key))
    ax.legend(fontsize=7)


def plot_epsilon(rows: list[dict[str, Any]], ax: Any) -> None:
    """Each merchant's epsilon after each round, with its budget when the merchant reported one
    (one dashed line per distinct budget, named after the merchants that share it). Merchants with
    the same epsilons would hide each other: each gets its own marker and line style, and its points
    are shifted a little sideways (the rounds are still whole numbers: see the x ticks)."""
    colors: dict[str, str] = {}
    sharing: dict[float, list[str]] = {}
    names = _merchants(rows)
    for i, name in enumerate(names):
        points = [(r["round"], round_epsilon(r["merchants"][name])) for r in rows if name in r["merchants"]]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            shift = (i - (len(names) - 1) / 2) * min(0.06, 0.3 / max(1, len(names)))
            xs = [x + shift for x, _ in points]
            line = ax.plot(
                xs,
                [y for _, y in points],
                marker=MARKERS[i % len(MARKERS)],
                linestyle=LINESTYLES[i % len(LINESTYLES)],
                markerfacecolor="none" if i % 2 else None,
                label=name,
            )[0]
            colors[name] = line.get_color()
            budgets = [r["merchants"][name].get("max_epsilon") for r in rows if name in r["merchants"]]
            budget = next((b for b in reversed(budgets) if b is not None), None)
            if budget is not None:
                sharing.setdefault(float(budget), []).append(name)
    for budget, names_sharing in sharing.items():
        color = colors[names_sharing[0]] if len(names_sharing) == 1 else "grey"
        ax.axhline(budget, linestyle="--", color=color, label=f"{', '.join(names_sharing)} budget")
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


PLOTS: dict[str, tuple[str, Callable[[list[dict[str, Any]], Any], None] | None]] = {
    "metrics.png": ("Federated evaluation per round, with noise bands", None),  # a figure of its own axes
    "epsilon.png": ("Epsilon per merchant per round", plot_epsilon),
    "participation.png": ("Participation and status per round", plot_participation),
    "bytes.png": ("Bytes up per round", plot_bytes),
}
"""Every plot of the report: file name → (title, draw on one axis; None: `plot_metrics`'s grid)."""


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
    ".plot{display:inline-block;width:49%;vertical-align:top}.plot.wide{display:block;width:100%}"
    "h2{font-size:17px}td.noise{color:#888;font-style:italic}td.exact{color:#333;background:#f3f3f3}"
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

    exact = read_exact(run_dir)
    figures = []
    for name, (title, draw) in PLOTS.items():
        if draw is None:
            fig = plt.figure(figsize=(10, 6.4))
            axes = plot_metrics(rows, fig, exact)
        else:
            fig, ax = plt.subplots(figsize=(8, 4.2))
            draw(rows, ax)
            axes = [ax]
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        if name == "participation.png":
            axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))  # so are merchants
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        wide = " wide" if draw is None else ""
        figures.append(
            f'<div class="plot{wide}"><h2>{html.escape(title)}</h2>'
            f'<img alt="{name}" src="data:image/png;base64,{data}"></div>'
        )
    index = out / "index.html"
    index.write_text(_page(record, figures, rows, exact), encoding="utf-8")
    return index


def _metric_cell(key: str, value: Any, band: Band | None) -> str:
    """One cell of the per-round table: "0.745 ± 0.031", "unreadable" (the reason on hover), a plain value."""
    if band is not None:
        if key == "examples" and band.value is not None and band.sd is not None:
            css = "" if band.readable else f' class="noise" title="{html.escape(band.reason)}"'
            return f"<td{css}>{band.value:.0f} &plusmn; {band.sd:.0f}</td>"  # a count shows its own noise
        if not band.readable:
            return f'<td class="noise" title="{html.escape(band.reason)}">unreadable</td>'
        text = describe(key, band).removeprefix(f"{LABELS.get(key, key)} ")
        return f"<td>{html.escape(text)}</td>"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"<td>{value:.0f}</td>" if key == "examples" else f"<td>{value:.3f}</td>"
    return "<td>-</td>"


def _rounds_table(rows: list[dict[str, Any]], exact: list[dict[str, Any]]) -> str:
    """Per round: the federated metrics with their noise sd (or why unreadable), and the exact
    pooled metrics of a simulation when the run folder has them."""
    keys = [k for k in (*METRIC_AXES, "examples") if any(k in r.get("global", {}) for r in rows)]
    exact_by_round = {e["round"]: e.get("model", {}) for e in exact}
    exact_keys = [k for k in METRIC_AXES if any(k in m for m in exact_by_round.values())]
    head = "".join(f"<th>{html.escape(LABELS.get(k, k))}</th>" for k in keys)
    head += "".join(f"<th>exact {html.escape(LABELS.get(k, k))}</th>" for k in exact_keys)
    body = []
    for row in rows:
        g = row.get("global", {})
        found = row_bands(g) or {}
        cells = "".join(_metric_cell(k, g.get(k), found.get(k)) for k in keys)
        mine = exact_by_round.get(row["round"], {})
        cells += "".join(
            f'<td class="exact">{mine[k]:.3f}</td>' if k in mine else "<td>-</td>" for k in exact_keys
        )
        body.append(f"<tr><td>{row['round']}</td>{cells}</tr>")
    note = (
        "<p>&ldquo;exact&rdquo;: pooled from every merchant&rsquo;s local evaluation log, which only a "
        "simulation&rsquo;s operator holds (a deployment never releases it).</p>"
        if exact_keys
        else ""
    )
    return (
        "<h2>Federated evaluation per round</h2>"
        f"<table><tr><th>round</th>{head}</tr>{''.join(body)}</table>"
        "<p>&plusmn;: the noise sd of each value; hover over &ldquo;unreadable&rdquo; for the reason.</p>"
        + note
    )


def _page(
    record: dict[str, Any],
    figures: list[str],
    rows: list[dict[str, Any]] | None = None,
    exact: list[dict[str, Any]] | None = None,
) -> str:
    """The HTML page: the last round's metrics with their noise, the plots, the per-round table, the
    DP settings."""
    run = html.escape(record["run"])
    metrics = record["metrics"]
    values = {k: v for k, v in metrics["values"].items() if k not in ("bands", "noise_sd")}
    lines = describe_metrics(values | {"bands": metrics.get("bands") or {}})
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    exact_last = metrics.get("exact")
    exact_line = (
        f"<p>Exact (simulation only), round {exact_last['round']}: "
        + ", ".join(
            f"{html.escape(LABELS.get(k, k))} {exact_last[k]:.3f}" for k in METRIC_AXES if k in exact_last
        )
        + ".</p>"
        if exact_last
        else ""
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>fedbehavior run {run}</title>"
        f"<style>{STYLE}</style></head><body><h1>Run {run}</h1>"
        f"<p>Trained: {html.escape(str(record.get('trained', 'not in the run folder')))}.</p>"
        f"<p><b>Last round {metrics['round']}</b>, federated evaluation (&plusmn; the noise sd):</p>"
        f"<ul>{summary}</ul>"
        + exact_line
        + f"<p>{html.escape(metrics.get('release') or release_description(None))} "
        f"Evaluation set: {html.escape(metrics['evaluation_set'])}.</p>"
        + "".join(figures)
        + (_rounds_table(rows, exact or []) if rows else "")
        + _dp_section(record)
        + "</body></html>\n"
    )


TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_HINT = "pip install 'fedbehavior[tensorboard]'"


class MissingExtraError(RuntimeError):
    """An optional feature whose package is not installed; the message names the extra to install."""


def tensorboard_scalars(rows: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """(tag, value, round) for every scalar TensorBoard shows: `global/<metric>` per round (and
    `noise_sd/<metric>`, how far the evaluation noise moves it, when the row has its band),
    `epsilon/<merchant>` and `bytes_up/<merchant>` (plus `bytes_up/total`, and `bytes_down/total`
    when recorded) per training round. Nulls (a metric the noise made undefined) are left out."""
    out: list[tuple[str, float, int]] = []
    for row in rows:
        step = int(row["round"])
        for key, value in row.get("global", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append((f"global/{key}", float(value), step))
        for key, band in sorted((row_bands(row.get("global", {})) or {}).items()):
            if band.sd is not None:  # how far the evaluation noise moves global/<key>
                out.append((f"noise_sd/{key}", float(band.sd), step))
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
