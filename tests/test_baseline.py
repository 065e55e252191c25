"""The local-only baseline: the logistic regression against scikit-learn, its DP sensitivity bound."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression as SkLogisticRegression

from client.evaluation.baseline import (
    COUNT_SCALE,
    LIPSCHITZ,
    NAME_BUCKETS,
    ROLES,
    LogisticRegression,
    baseline_probabilities,
    behaviour_counts,
    cross_validated_probabilities,
)
from shared.schema import Behavior, Event
from shared.tasks import Candidate, stable_hash


def candidate(
    customer: str, behaviours: list[str], label: int = 0, names: list[str] | None = None
) -> Candidate:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    events = tuple(
        Event(
            customer_id=customer,
            session_id="s",
            timestamp=t0 + timedelta(minutes=i),
            behavior=b,
            event_name=names[i] if names else None,
        )
        for i, b in enumerate(behaviours)
    )
    return Candidate(customer, "s", events, label)


def data(seed: int, n: int, features: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, features))
    logits = x @ rng.normal(0, 1.5, (features, classes))
    y = np.array([rng.choice(classes, p=np.exp(r) / np.exp(r).sum()) for r in logits])
    return x, y


def test_behaviour_counts_by_hand() -> None:
    names = ["product_view", "promo page", "product_view", "add_to_cart"]
    x = behaviour_counts([candidate("a", ["view", "other", "view", "cart"], names=names)])
    raw = np.zeros(len(ROLES) + NAME_BUCKETS + 1)
    raw[ROLES.index(Behavior.VIEW)], raw[ROLES.index(Behavior.OTHER)], raw[ROLES.index(Behavior.CART)] = (
        2,
        1,
        1,
    )
    for name, n in (("product view", 2), ("promo page", 1), ("add to cart", 1)):  # Event.name's readable form
        raw[len(ROLES) + stable_hash("baseline-event-name", name) % NAME_BUCKETS] += n
    raw[-1] = 4
    np.testing.assert_allclose(x[0], np.log1p(raw) / COUNT_SCALE)
    long = behaviour_counts([candidate("b", ["view"] * 500 + ["buy"] * 500)])
    assert np.linalg.norm(long[0]) == pytest.approx(1.0)  # clipped: every example's norm ≤ 1


def test_event_names_tell_apart_what_their_roles_do_not() -> None:
    # two shops' exports with the same funnel roles: the names are what the regression can learn from
    home = candidate("a", ["other"] * 3, names=["home"] * 3)
    search = candidate("b", ["other"] * 3, names=["filter_results"] * 3)
    x = behaviour_counts([home, search])
    roles = len(ROLES)
    np.testing.assert_array_equal(x[0, :roles], x[1, :roles])
    assert not np.array_equal(x[0, roles:-1], x[1, roles:-1])
    # an event without a shop name counts under its role's name
    plain = behaviour_counts([candidate("c", ["view", "view"])])[0]
    assert plain[roles + stable_hash("baseline-event-name", "view") % NAME_BUCKETS] == pytest.approx(
        np.log1p(2) / COUNT_SCALE
    )


@pytest.mark.parametrize("l2", [0.5, 5.0])
def test_multinomial_fit_matches_sklearn(l2: float) -> None:
    x, y = data(0, 300, 4, 3)
    ours = LogisticRegression.fit(x, y, num_classes=3, l2=l2)
    # the same objective: Σ cross-entropy + ½·‖W‖²/C, with the intercept as a (penalised) feature
    z = np.hstack([x, np.ones((len(x), 1))])
    sk = SkLogisticRegression(C=1 / l2, fit_intercept=False, tol=1e-12, max_iter=10_000).fit(z, y)
    np.testing.assert_allclose(ours.predict_proba(x), sk.predict_proba(z), atol=1e-5)


def test_binary_fit_matches_sklearn() -> None:
    x, y = data(1, 200, 3, 2)
    l2 = 2.0
    ours = LogisticRegression.fit(x, y, num_classes=2, l2=l2)
    # two softmax columns w₀ = −w₁ = w/2 penalised by (l2/2)·2·‖w/2‖² = sklearn's single w with C = 2/l2
    z = np.hstack([x, np.ones((len(x), 1))])
    sk = SkLogisticRegression(C=2 / l2, fit_intercept=False, tol=1e-12, max_iter=10_000).fit(z, y)
    np.testing.assert_allclose(ours.predict_proba(x)[:, 1], sk.predict_proba(z)[:, 1], atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_removing_one_customer_moves_the_weights_by_at_most_l_over_lambda(seed: int) -> None:
    # the output-perturbation guarantee rests on this bound: check it where it is tightest (an outlier)
    x, y = data(seed, 80, 5, 3)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1.0)  # as behaviour_counts clips
    x[0] = np.eye(5)[0]  # a unit-norm outlier with a rare label
    y[0] = 2
    l2 = 1.0
    full = LogisticRegression.fit(x, y, num_classes=3, l2=l2).weights
    worst = 0.0
    for i in range(10):
        keep = np.arange(len(x)) != i
        without = LogisticRegression.fit(x[keep], y[keep], num_classes=3, l2=l2).weights
        worst = max(worst, float(np.linalg.norm(full - without)))
    assert 0 < worst <= LIPSCHITZ / l2


def test_perturbation_noise_has_std_sigma_l_over_lambda() -> None:
    model = LogisticRegression(np.zeros((200, 50)))
    noisy = model.perturbed(3.0, l2=4.0, seed=0).weights
    assert noisy.std() == pytest.approx(3.0 * LIPSCHITZ / 4.0, rel=0.03)


def test_baseline_learns_and_refuses_two_examples_of_one_customer() -> None:
    train = [candidate(f"b{i}", ["view"] * (1 + i % 3) + ["search"] * (i % 2), i % 2) for i in range(60)]
    held_out = [candidate("h0", ["view", "search"]), candidate("h1", ["view"])]
    noisy, exact = baseline_probabilities(train, held_out, 2, noise_multiplier=1e-6, seed=0)
    assert exact.shape == (2, 2) and exact[0, 1] > exact[1, 1]  # searchers bought in training
    np.testing.assert_allclose(noisy, exact, atol=1e-5)  # σ ≈ 0: the perturbation vanishes
    noisy, _ = baseline_probabilities(train, held_out, 2, noise_multiplier=50.0, seed=0)
    assert not np.allclose(noisy, exact, atol=1e-2)
    with pytest.raises(ValueError, match="one example per customer"):
        baseline_probabilities([train[0], train[0]], held_out, 2, noise_multiplier=1.0)


def test_cross_validated_probabilities_match_a_per_fold_loop() -> None:
    rng = np.random.default_rng(3)
    train = [
        candidate(
            f"c{i}", ["view"] * int(rng.integers(1, 6)) + ["cart"] * int(rng.integers(0, 3)), int(i % 3 == 0)
        )
        for i in range(23)
    ]
    oof = cross_validated_probabilities(train, 2, folds=4, salt="m")
    x, y = behaviour_counts(train), np.array([c.label for c in train])
    # by hand: customers in order of their hash, dealt into 4 folds; each fold scored without itself
    ranked = sorted(range(len(train)), key=lambda i: stable_hash("cv", "m", train[i].customer_id))
    for f in range(4):
        fold = ranked[f::4]
        rest = [i for i in range(len(train)) if i not in fold]
        assert len(fold) in (5, 6)
        model = LogisticRegression.fit(x[rest], y[rest], num_classes=2)
        np.testing.assert_allclose(oof[fold], model.predict_proba(x[fold]), rtol=1e-9)
    in_sample = LogisticRegression.fit(x, y, num_classes=2).predict_proba(x)
    assert not np.allclose(oof, in_sample, atol=1e-3)  # never the model that fitted the customer
    assert cross_validated_probabilities(train, 2, folds=4, salt="other").tolist() != oof.tolist()
    with pytest.raises(ValueError, match="folds"):
        cross_validated_probabilities(train[:3], 2, folds=4)
