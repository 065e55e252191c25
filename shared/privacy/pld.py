"""PLD (privacy-loss distribution) accounting of the Poisson-subsampled Gaussian, the `pld` accountant.

The privacy-loss distribution of one step of DP-SGD (Gaussian noise σ, Poisson sampling rate q,
add/remove-one neighbours) is discretised *pessimistically* (every rounding makes the loss larger), so
the composed distribution's epsilon is an upper bound on the true epsilon, and a tight one: about 10%
below RDP's at the same noise (q=0.1, σ=1, 100 steps, δ=1e-5: 7.05 against 7.90).

The distributions come from Google's dp-accounting (`privacy_loss_distribution`), imported only when
this accountant is used. A segment of `steps` identical steps is one self-composition (an FFT power);
segments are then composed in a fixed (sorted) order, so the number is reproducible bit for bit from a
ledger's history, and any other PLD implementation agrees to well under 1% (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

VALUE_DISCRETIZATION_INTERVAL = 1e-3
"""Grid of the privacy loss. 1e-3 is within 0.05% of dp-accounting's default 1e-4 on the histories
tested at a tenth of the cost; 1e-2 is off by up to 2% on long histories (5,000 steps)."""


def _pld_module() -> Any:
    try:
        from dp_accounting.pld import privacy_loss_distribution
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError(
            "the pld accountant needs the dp-accounting package (pip install dp-accounting); "
            'or set accountant = "rdp" in the merchant settings'
        ) from err
    return privacy_loss_distribution


@lru_cache(maxsize=32)  # a PLD holds ~1 MB (up to ~10 MB at very low noise)
def _segment_pld(noise_multiplier: float, sample_rate: float, steps: int) -> Any:
    """The PLD of `steps` steps at (σ, q), cached: a ledger's history is recomposed on every read."""
    one_step = _pld_module().from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        sensitivity=1.0,
        pessimistic_estimate=True,
        value_discretization_interval=VALUE_DISCRETIZATION_INTERVAL,
        sampling_prob=sample_rate,
    )
    return one_step.self_compose(steps) if steps > 1 else one_step


@lru_cache(maxsize=32)  # a PLD holds ~1 MB (up to ~10 MB at very low noise)
def _composed_pld(segments: tuple[tuple[float, float, int], ...]) -> Any:
    """The PLD of all `segments` (sorted), built by extending the cached PLD of all but the last."""
    last = _segment_pld(*segments[-1])
    return last if len(segments) == 1 else _composed_pld(segments[:-1]).compose(last)


def pld_epsilon(segments: Iterable[tuple[float, float, int]], delta: float) -> float:
    """PLD epsilon at `delta` of the composition of `(noise_multiplier, sample_rate, steps)` segments."""
    key = tuple(sorted((float(s), float(q), int(n)) for s, q, n in segments if n > 0))
    if not key:
        return 0.0
    eps = float(_composed_pld(key).get_epsilon_for_delta(delta))
    return eps if math.isfinite(eps) else math.inf
