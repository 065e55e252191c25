"""The merchant's local-only baseline: what it could build alone, to compare the federated model with.

An L2-regularised (multinomial) logistic regression on behaviour counts of each example's events
(its funnel roles and the shop's own event names, hashed into public buckets), fitted on the
merchant's own training customers (one example each) and evaluated on its held-out customers.
Plain NumPy (Newton's method), no new dependency.

It is private towards the training customers by output perturbation (Chaudhuri et al. 2011): the
objective Σᵢ ℓᵢ(W) + (Λ/2)‖W‖² is Λ-strongly convex and each ℓᵢ is L-Lipschitz in W (features are
publicly scaled and clipped to norm ≤ 1, plus an intercept feature 1, so L ≤ ‖p − y‖·‖x‖ ≤ 2), so
adding or removing one customer moves the minimiser by at most L/Λ; Gaussian noise of standard
deviation σ·L/Λ on W is the Gaussian mechanism with noise multiplier σ (one ledger charge). Its
evaluation then leaves through the same noisy, charged histogram as the federated model's.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.schema import Behavior
from shared.tasks import Candidate, stable_hash

ROLES: tuple[Behavior, ...] = tuple(Behavior)
COUNT_SCALE = float(np.log1p(100.0))
"""Public feature scale: log(1 + 100 events) maps to 1. Never the data's own mean or spread, which
would make every example's features depend on every other customer."""
LIPSCHITZ = 2.0
"""Bound on ‖∇_W ℓ(W; x, y)‖ = ‖p − y‖·‖x‖ ≤ √2·√2 (clipped features plus the intercept feature)."""
DEFAULT_L2 = 5.0
"""Λ: more shrinks the weights towards 0 and the noise (σ·L/Λ) with them."""


NAME_BUCKETS = 32
"""The shop's own event names ("promo page", "filter results") are counted in this many hashed buckets:
a public feature map, the same for every merchant and every export. A vocabulary read off the
merchant's data would make one customer's features depend on the others' (and break the bound
below); names that share a bucket are counted together."""


@functools.lru_cache(maxsize=4096)
def name_bucket(name: str) -> int:
    """The hashed bucket of an event name (its readable form, `Event.name`)."""
    return stable_hash("baseline-event-name", name) % NAME_BUCKETS


def behaviour_counts(candidates: Sequence[Candidate]) -> np.ndarray:
    """Features per example: log(1 + count) of each behaviour role in its events, of each hashed
    event-name bucket, and of their number, divided by `COUNT_SCALE`, the vector clipped to norm ≤ 1.

    Log counts: a customer with 40 views is not 40 times one with one view. An event without a shop
    name counts under its role's name, so a closed-vocabulary export gets the role counts twice.
    """
    roles = len(ROLES)
    counts = np.zeros((len(candidates), roles + NAME_BUCKETS + 1), dtype=np.float64)
    index = {role: i for i, role in enumerate(ROLES)}
    for row, candidate in enumerate(candidates):
        for event in candidate.prefix:
            counts[row, index[event.behavior]] += 1.0
            counts[row, roles + name_bucket(event.name)] += 1.0
        counts[row, -1] = len(candidate.prefix)
    x = np.log1p(counts) / COUNT_SCALE
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1.0)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _with_intercept(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((x.shape[0], 1))])


@dataclass(frozen=True)
class LogisticRegression:
    """A fitted model: softmax([x, 1]·W)."""

    weights: np.ndarray  # (features + 1) × classes, the last row the intercepts

    @classmethod
    def fit(
        cls, x: np.ndarray, y: np.ndarray, *, num_classes: int, l2: float = DEFAULT_L2, iterations: int = 50
    ) -> LogisticRegression:
        """The exact minimiser of Σᵢ cross-entropy + (l2/2)·‖W‖² (intercepts penalised too), by
        damped Newton steps; the objective of scikit-learn's `LogisticRegression(C=1/l2)` with the
        intercept as a feature. A class absent from `y` gets low scores, not an error."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"need one label per example, got {x.shape}, {y.shape}")
        if l2 <= 0:
            raise ValueError(f"l2 must be positive (it makes the minimiser unique), got {l2}")
        if x.shape[0] == 0:  # no examples: the penalty alone, whose minimiser is W = 0
            return cls(np.zeros((x.shape[1] + 1, num_classes)))
        z = _with_intercept(x)
        onehot = np.eye(num_classes)[y]
        w = np.zeros((z.shape[1], num_classes))

        def objective(weights: np.ndarray) -> float:
            logits = z @ weights
            top = logits.max(axis=1, keepdims=True)
            log_norm = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True))).ravel()
            return float((log_norm - (logits * onehot).sum(axis=1)).sum() + 0.5 * l2 * (weights**2).sum())

        for _ in range(iterations):
            step = _newton_step(z, onehot, w, l2)
            current, t = objective(w), 1.0
            while objective(w - t * step) > current and t > 1e-6:  # backtracking keeps every step downhill
                t /= 2
            w = w - t * step
            if t * np.abs(step).max() < 1e-10:
                break
        return cls(w)

    def perturbed(self, noise_multiplier: float, *, l2: float, seed: int | None = None) -> LogisticRegression:
        """Output perturbation: N(0, (σ·L/Λ)²) on every weight. `seed` is for tests only."""
        rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
        std = noise_multiplier * LIPSCHITZ / l2
        return LogisticRegression(self.weights + rng.normal(0.0, std, self.weights.shape))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (examples × classes)."""
        return _softmax(_with_intercept(x) @ self.weights)


def _newton_step(z: np.ndarray, onehot: np.ndarray, w: np.ndarray, l2: float) -> np.ndarray:
    """Newton direction of the penalised multinomial cross-entropy at `w` (same shape as `w`)."""
    d = z.shape[1]
    k = onehot.shape[1]
    p = _softmax(z @ w)
    grad = z.T @ (p - onehot) + l2 * w
    # Hessian block (a, b) = Σᵢ pᵢₐ(δₐᵦ − pᵢᵦ) zᵢzᵢᵀ, laid out with the class index outermost
    hessian = np.zeros((k * d, k * d))
    for a in range(k):
        for b in range(a, k):
            weight = p[:, a] * ((a == b) - p[:, b])
            block = (z * weight[:, None]).T @ z
            hessian[a * d : (a + 1) * d, b * d : (b + 1) * d] = block
            hessian[b * d : (b + 1) * d, a * d : (a + 1) * d] = block
    hessian += l2 * np.eye(k * d)
    flat_grad = grad.T.ravel()  # class-major, matching the Hessian's layout
    step = np.linalg.solve(hessian, flat_grad)  # positive definite: l2 > 0
    return step.reshape(k, d).T


def baseline_probabilities(
    train: Sequence[Candidate],
    held_out: Sequence[Candidate],
    num_classes: int,
    *,
    noise_multiplier: float,
    l2: float = DEFAULT_L2,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out class probabilities of the counts logistic regression fitted on `train` (one
    example per customer): (perturbed with noise multiplier `noise_multiplier`, the one that may be
    released; exact, for the merchant's own log only)."""
    if len({c.customer_id for c in train}) != len(train):
        raise ValueError("the baseline's training set must hold one example per customer (its privacy unit)")
    labels = np.asarray([c.label for c in train], dtype=np.int64)
    model = LogisticRegression.fit(behaviour_counts(train), labels, num_classes=num_classes, l2=l2)
    x = behaviour_counts(held_out)
    return model.perturbed(noise_multiplier, l2=l2, seed=seed).predict_proba(x), model.predict_proba(x)


def cross_validated_probabilities(
    train: Sequence[Candidate], num_classes: int, *, folds: int = 5, salt: str = "", l2: float = DEFAULT_L2
) -> np.ndarray:
    """Out-of-fold class probabilities of the counts regression on `train` (one example per
    customer): customers are ordered by a stable hash of (`salt`, customer) and dealt into `folds`
    folds in turn, and each fold is scored by the regression fitted on the other folds. What the
    merchant alone would score on customers it did not fit, measured on every training customer
    instead of a small slice (exact: for the merchant's own eyes)."""
    if folds < 2 or len(train) < folds:
        raise ValueError(
            f"cross-validation needs folds ≥ 2 and at least that many examples, got {folds} and {len(train)}"
        )
    order = sorted(range(len(train)), key=lambda i: stable_hash("cv", salt, train[i].customer_id))
    fold = np.empty(len(train), dtype=np.int64)
    fold[order] = np.arange(len(train)) % folds
    x = behaviour_counts(train)
    labels = np.asarray([c.label for c in train], dtype=np.int64)
    out = np.zeros((len(train), num_classes))
    for f in range(folds):
        inside = fold == f
        model = LogisticRegression.fit(x[~inside], labels[~inside], num_classes=num_classes, l2=l2)
        out[inside] = model.predict_proba(x[inside])
    return out
