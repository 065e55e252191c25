"""The scale benchmark's quick grid: every point in the printed tables, both PNGs written to --out.

Slow: it starts a fresh process per point and a Ray simulation (about a minute on a quiet 2-core
machine, several on a busy one).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.bench_scale import (
    MINILM_LABEL,
    SMALL_LABEL,
    Phases,
    exponent,
    extrapolate_minilm,
    parse_sizes,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_grid_prints_every_point_and_draws_both_curves(tmp_path: Path) -> None:
    out = tmp_path / "figures"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "simulations.bench_scale", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    text = done.stdout
    assert done.returncode == 0, text[-3000:] + done.stderr[-3000:]
    assert "not measured" not in text
    customers = re.findall(rf"^{re.escape(SMALL_LABEL)}\s+(\d+)\s+\d+\+\d+\s", text, flags=re.M)
    assert customers == ["30", "60"]  # the customers table, one row per point
    phase_rows = re.findall(rf"^{re.escape(SMALL_LABEL)}\s+(\d+)\s+([012])\s", text, flags=re.M)
    assert sorted(phase_rows) == [(n, r) for n in ("30", "60") for r in "012"]
    merchants = re.findall(r"^\s+(\d+)\s+20\s+[\d.]+\s+[\d.]+\s+[\d.]+\s", text, flags=re.M)
    assert merchants == ["2"]
    assert "slowest point: " in text
    assert "How each cost grows" in text
    for name in ("scale-customers.png", "scale-merchants.png"):
        assert (out / name).stat().st_size > 10_000
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_phases_are_exclusive() -> None:
    phases = Phases()

    def inner() -> None:
        pass

    timed_inner = phases.wrap("inner", inner)

    def outer() -> None:
        timed_inner()

    phases.wrap("outer", outer)()
    assert set(phases.seconds) == {"outer", "inner"}
    assert all(s >= 0 for s in phases.seconds.values())


def test_growth_helpers() -> None:
    assert parse_sizes("1000,1e4, 100000,") == [1000, 10000, 100000]
    assert exponent([1, 10, 100], [2, 20, 200]) == pytest.approx(1.0)
    rounds = [
        {"round": i, "wall_s": 10.0, "backbone_rows": 100, "phases": {"backbone": 5.0}} for i in range(3)
    ]
    minilm = {"label": MINILM_LABEL, "base": 1000, "rounds": rounds}
    small = [
        {"label": SMALL_LABEL, "base": b, "rounds": [{**r, "phases": {"backbone": 1.0}} for r in rounds]}
        for b in (1000, 10000)
    ]
    (estimate,) = extrapolate_minilm([minilm, *small])  # only the size MiniLM did not run
    assert estimate["base"] == 10000
    assert estimate["rate"] == pytest.approx(20.0)  # 300 rows in 15 s
    assert estimate["round_s"] == [pytest.approx(10.0 - 1.0 + 100 / 20.0)] * 3
