"""The customer-level DP-SGD mechanism: one clipped gradient per customer, Gaussian noise on the sum.

A step Poisson-samples *customers* (rate q), sums the per-example gradients of each sampled customer's
examples into one per-customer gradient, clips that to `max_grad_norm` (C), sums over customers, adds
N(0, (σC)²) noise to every coordinate and divides by the expected number of customers q·N. Adding or
removing one customer changes the noised sum by at most C whatever its number of sessions, so the
analysis is the Poisson-subsampled Gaussian with rate q over customers: what the ledger records.

Sum, not mean, within a customer: both have the same sensitivity C and point the same way, but the sum
is never shorter (|clip(Σg)| ≥ |clip(mean g)|), so a customer whose sessions agree uses more of its clip
budget for signal against the same noise. With one example per customer both are per-example DP-SGD.

Per-example gradients come from Opacus's `GradSampleModule` (its grad samplers only); clipping, noise
and the grouping by customer are ours. Accounting is elsewhere (`shared.privacy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from client.ingest.encoded import Encoded
    from client.training.features import Features

EPS = 1e-6  # as Opacus: keeps the clip factor finite for a zero gradient


@dataclass(frozen=True)
class CustomerIndex:
    """Which example rows belong to which customer; customers are numbered 0 … N-1."""

    rows: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, groups: torch.Tensor | None, n_examples: int) -> CustomerIndex:
        """From a customer index per example (`groups[i]` = customer of example i), or, with None,
        one customer per example (per-example DP-SGD)."""
        if groups is None:
            return cls(tuple(torch.tensor([i]) for i in range(n_examples)))
        groups = torch.as_tensor(groups, dtype=torch.long)
        if groups.shape != (n_examples,):
            raise ValueError(
                f"groups: need one customer per example ({n_examples}), got {tuple(groups.shape)}"
            )
        if n_examples == 0:
            return cls(())
        rows = tuple(torch.nonzero(groups == c).flatten() for c in range(int(groups.max()) + 1))
        if int(groups.min()) < 0 or any(len(r) == 0 for r in rows):
            raise ValueError("groups: number the customers 0 … N-1, each with at least one example")
        return cls(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Example rows of the `sampled` customers, and each row's position in `sampled`."""
        if len(sampled) == 0:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        parts = [self.rows[int(c)] for c in sampled]
        local = torch.cat([torch.full((len(p),), j, dtype=torch.long) for j, p in enumerate(parts)])
        return torch.cat(parts), local


def poisson_sample(n_customers: int, rate: float) -> torch.Tensor:
    """Each customer independently with probability `rate` (the global RNG: seed it outside)."""
    return torch.nonzero(torch.rand(n_customers) < rate).flatten()


def per_customer_gradients(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    data: Encoded | Features,
    rows: torch.Tensor,
    local: torch.Tensor,
    n_customers: int,
    *,
    device: torch.device,
    chunk: int,
) -> tuple[list[torch.Tensor], float]:
    """Summed per-example gradients of each of `n_customers` customers (`local[i]` = customer of
    `rows[i]`), one tensor of shape (n_customers, *p.shape) per parameter, and the summed loss.

    `model` must be a `GradSampleModule` with `loss_reduction="sum"`. Rows are processed `chunk` at a
    time (memory only: the result does not depend on it).
    """
    sums = [torch.zeros((n_customers, *p.shape), device=device, dtype=p.dtype) for p in params]
    loss_total = 0.0
    for start in range(0, len(rows), chunk):
        idx, owner = rows[start : start + chunk], local[start : start + chunk].to(device)
        logits = model(**data.inputs(idx, device)).logits
        loss = torch.nn.functional.cross_entropy(logits, data.labels[idx].to(device), reduction="sum")
        loss.backward()
        for acc, p in zip(sums, params, strict=True):
            acc.index_add_(0, owner, p.grad_sample)  # type: ignore[attr-defined]
            p.grad_sample = None  # type: ignore[attr-defined]  # else Opacus stacks the next chunk's
            p.grad = None
        loss_total += float(loss.detach())
    return sums, loss_total


def clip_and_sum(per_customer: list[torch.Tensor], max_grad_norm: float) -> list[torch.Tensor]:
    """Σ over customers of each customer's gradient scaled to norm ≤ `max_grad_norm` (the norm is
    over all parameters together, as in DP-SGD)."""
    # no customer sampled: the norms are empty and the sums zero, which is right (noise only follows)
    per_customer = finite_or_zero(per_customer)
    norms = torch.sqrt(sum((g.flatten(1).double() ** 2).sum(1) for g in per_customer))  # type: ignore[arg-type]
    factor = (max_grad_norm / (norms + EPS)).clamp(max=1.0)
    factor = torch.where(torch.isfinite(norms), factor, torch.zeros_like(factor)).to(per_customer[0].dtype)
    return [torch.einsum("c,c...->...", factor, g) for g in per_customer]


def finite_or_zero(per_customer: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each customer's gradient, or zeros where any of its coordinates is not finite.

    A coordinator-chosen adapter may overflow for some customers' inputs only; left in, one inf would
    make the clipped sum NaN, and whether the round failed would tell who is in the data. Zeroing
    the customer's whole gradient before clipping keeps the sum's sensitivity at the clip: the
    customer then contributes nothing, which is within what adding or removing it may change."""
    if not per_customer or per_customer[0].shape[0] == 0:
        return per_customer
    finite = torch.stack([torch.isfinite(g.flatten(1)).all(1) for g in per_customer]).all(0)
    if bool(finite.all()):
        return per_customer
    return [
        torch.where(finite.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros_like(g)) for g in per_customer
    ]


def noisy_mean(
    summed: list[torch.Tensor], *, noise_std: float, expected_customers: float
) -> list[torch.Tensor]:
    """(sum + N(0, noise_std²)) / expected_customers: added even when nobody was sampled, so the
    mechanism that runs is the one analysed."""
    if expected_customers <= 0:
        raise ValueError(f"expected number of customers must be positive, got {expected_customers}")
    return [(s + noise_std * torch.randn_like(s)) / expected_customers for s in summed]
