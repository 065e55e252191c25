import json
import os
from pathlib import Path

import pytest

# Whole modules that start real processes (SuperLink, SuperNodes, Ray), train through a full run, or
# search the coordinator's message space at length: `make test` runs them, `make test-fast` (the edit
# loop, `-m "not slow"`) leaves them out. Single slow tests elsewhere carry @pytest.mark.slow.
SLOW_MODULES = {
    "test_deploy",
    "test_warm_exec",
    "test_ray_cluster",
    "test_simulation_e2e",
    "test_ingested_simulation",
    "test_open_events_simulation",
    "test_neighbouring_replies",
    "test_study_smoke",
    "test_bench_scale",
}

# Single tests of 10 s or more on the 2-core machine (pytest --durations), whole training runs of
# several rounds or real processes: also left to `make test`.
SLOW_TESTS = {
    "test_noise_is_calibrated_for_the_whole_horizon",
    "test_personalise_end_to_end_and_predict_on_the_result",
    "test_command_reloads_on_sighup_and_drains_on_sigterm",
    "test_rounds_accumulate_across_runs_and_restarts",
    "test_server_suggestion_cannot_lower_the_merchants_noise_floor",
    "test_a_run_leaves_each_merchant_the_final_global_adapter",
    "test_bisecting_a_time_cutoff_gets_the_same_answer_everywhere",
    "test_neighbouring_sizes_run_the_same_mechanism",
    "test_a_merchant_keeps_its_features_in_its_state_folder",
    "test_per_run_cap_bounds_a_one_round_run",
    "test_a_huge_head_gives_the_same_status_with_and_without_the_target",
    "test_an_export_as_the_global_model",
    "test_a_customer_with_fifty_sessions_moves_the_sum_by_at_most_the_clip",
    "test_export_loads_without_fedbehavior_or_peft",
    "test_training_reserves_the_runs_evaluations",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        if module in SLOW_MODULES or item.name.split("[", 1)[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny BERT backbone built locally from a config."""
    from tests.tiny import build_tiny_bert

    path = str(build_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))
    # a merchant's policy lists the backbones its approved app may load: the packaged one and, in
    # tests, this tiny one (subprocesses inherit it)
    os.environ["FEDBEHAVIOR_MERCHANT_POLICY__BACKBONES"] = json.dumps(["", path])
    return path


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    """A synthetic merchant folder of about 60 customers (seed 3, merchant 0): data and settings.
    A module that needs another size defines its own `shop`."""
    from simulations.synthetic import generate_merchant

    generate_merchant(3, 0, tmp_path / "m0", base_customers=60)
    return tmp_path / "m0"
