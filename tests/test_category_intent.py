"""category-intent: label = category of the next item acted on; fixed label list; top-k accuracy."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from sklearn.metrics import top_k_accuracy_score

from shared.config import RunConfig
from shared.metrics import top_k_accuracy
from shared.schema import Behavior, Event
from shared.tasks import DEFAULT_CATEGORIES, NEXT_CUT, _cut_position, category_intent, get_task
from simulations.catalog import CATEGORIES

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def session(categories: list[str | None], sid: str) -> list[Event]:
    out = []
    for i, c in enumerate(categories):
        if c is None:
            out.append(
                Event(
                    customer_id="c",
                    session_id=sid,
                    timestamp=T0 + timedelta(minutes=i),
                    behavior=Behavior.SEARCH,
                    query="gift ideas",
                )
            )
        else:
            out.append(
                Event(
                    customer_id="c",
                    session_id=sid,
                    timestamp=T0 + timedelta(minutes=i),
                    behavior=Behavior.VIEW,
                    item_id=f"{c}-{i}",
                    category=c,
                )
            )
    return out


def test_default_labels_are_the_synthetic_catalogue() -> None:
    assert set(DEFAULT_CATEGORIES) == set(CATEGORIES)
    assert get_task("category-intent").labels[-1] == "other"
    assert RunConfig.parse({"task": "category-intent"}).task_spec.num_labels == len(DEFAULT_CATEGORIES) + 1


def test_label_is_the_next_category_acted_on_and_unknowns_are_other() -> None:
    task = get_task("category-intent", ("shoes", "books"))
    for k in range(50):
        sid = f"s{k}"
        t = _cut_position(sid, *NEXT_CUT)
        cats: list[str | None] = ["shoes"] * t + [None, "books", "shoes"]
        prefix, label = category_intent(session(cats, sid), task)  # type: ignore[misc]
        assert len(prefix) == t and task.labels[label] == "books"  # the search has no category: skipped
        prefix, label = category_intent(session(["toys"] * (t + 1), sid), task)  # type: ignore[misc]
        assert task.labels[label] == "other"
        assert category_intent(session(["shoes"] * t + [None], sid), task) == "no-category-after-cut"
        assert category_intent(session(["shoes"] * t, sid), task) == "session-shorter-than-cut"


@pytest.mark.parametrize("bad", [(), ("a", "a"), ("a", "other")])
def test_bad_label_lists_are_refused(bad: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="category-labels"):
        get_task("category-intent", bad)


def test_top_k_accuracy_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(9), size=200)
    labels = rng.integers(0, 9, size=200)
    for k in (1, 3, 5):
        expected = top_k_accuracy_score(labels, probs, k=k, labels=list(range(9)))
        assert top_k_accuracy(labels, probs, k) == pytest.approx(expected)


def test_time_split_keeps_the_future_out_of_training(tmp_path) -> None:
    from client.ingest.data import MerchantData, load_events
    from simulations.synthetic import generate_merchant

    generate_merchant(5, 1, tmp_path, base_customers=80)
    events, report = load_events(tmp_path, tmp_path / "state")
    data = MerchantData.build(
        events,
        get_task("category-intent"),
        eval_fraction=0.25,
        salt="m",
        report=report,
        split="time",
        cutoff=datetime(2026, 1, 25, tzinfo=timezone.utc),
    )
    last_train = max(c.ends_at for cs in data.train_candidates.values() for c in cs)  # type: ignore[type-var]
    first_eval = min(c.prefix[0].timestamp for cs in data.eval_candidates.values() for c in cs)
    assert last_train < first_eval
    n_train = sum(len(cs) for cs in data.train_candidates.values())
    n_eval = sum(len(cs) for cs in data.eval_candidates.values())
    assert 0.1 < n_eval / (n_train + n_eval) < 0.4
    chosen = data.train_round("r1")
    assert len({c.customer_id for c in chosen}) == len(chosen)  # one example per customer
