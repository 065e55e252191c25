"""The head sweep's grid: what `--grid recipe` and `--grid defaults` run."""

from __future__ import annotations

from shared.config import RunConfig
from simulations.experiments.head_sweep import RECIPE, settings_grid


def test_recipe_grid_is_the_product_of_the_varied_lists_over_the_run_configs_recipe() -> None:
    cfg = RunConfig.parse({"batch-size": 32})
    grid = settings_grid("recipe", cfg, [8.0, 3.0], ["l2"], {"clip": [1.0, 2.0], "epochs": [1, 10]})
    assert len(grid) == 2 * 2 * 2
    assert {(s["eps"], s["clip"], s["epochs"]) for s in grid} == {
        (e, c, n) for e in (8.0, 3.0) for c in (1.0, 2.0) for n in (1, 10)
    }
    assert {s["batch"] for s in grid} == {32} and {s["lr"] for s in grid} == {cfg.learning_rate}
    assert set(RECIPE) <= set(grid[0])  # every varied name is a setting the run reads


def test_defaults_grid_runs_the_run_configs_own_recipe_at_each_epsilon() -> None:
    cfg = RunConfig.parse({})
    grid = settings_grid("defaults", cfg, [1.0, 8.0], ["l2"])
    assert [s["eps"] for s in grid] == [1.0, 8.0]
    assert {(s["clip"], s["epochs"], s["batch"], s["k"]) for s in grid} == {
        (cfg.max_grad_norm, cfg.epochs, cfg.batch_size, cfg.examples_per_customer)
    }
