"""Local simulation: N synthetic merchants and the coordinator on one machine (Flower + Ray).

The merchants' data is generated into `<run>/merchants/merchant-<i>/` first; each simulated client
then reads its own folder through the same code path as a deployed merchant daemon.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.app import build_server_app, resolve_paths
from server.metrics import MetricsLog
from shared.config import RunConfig
from shared.synthetic import ensure_merchant
from simulations.exact import exact_rounds, format_table

log = logging.getLogger(__name__)


def simulate(
    overrides: Mapping[str, Any],
    *,
    merchants: int = 4,
    cpus_per_merchant: float = 1.0,
    gpus_per_merchant: float = 0.0,
) -> Path:
    """Run a local simulation; return the run folder. Raises if the run did not complete."""
    cfg = resolve_paths(RunConfig.parse(overrides), "sim")
    if merchants < cfg.min_available_nodes:
        raise ValueError(
            f"--merchants {merchants} is below min-available-nodes {cfg.min_available_nodes}: "
            "the server would wait forever; lower min-available-nodes or add merchants"
        )
    for i in range(merchants):
        ensure_merchant(
            cfg.sim_seed, i, Path(cfg.sim_root) / f"merchant-{i}", base_customers=cfg.sim_customers
        )

    from flwr.simulation import run_simulation

    from client.app import app as client_app

    # Flower logs through its own console handler; without this its DEBUG records also reach ours.
    logging.getLogger("flwr").propagate = False

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": cpus_per_merchant, "num_gpus": gpus_per_merchant},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    run_simulation(
        server_app=build_server_app(cfg.to_record(), announce=False),
        client_app=client_app,
        num_supernodes=merchants,
        backend_config=backend,
    )  # type: ignore[arg-type]
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    rows = MetricsLog(run_dir / "metrics.jsonl").rows()
    if len(rows) != cfg.num_rounds + 1 or not (run_dir / "final" / "adapter_config.json").exists():
        raise RuntimeError(
            f"simulation did not complete: {len(rows)} of {cfg.num_rounds + 1} metric rows "
            f"in {run_dir}; see the log above"
        )
    exact = exact_rounds(
        (Path(cfg.sim_root) / f"merchant-{i}" for i in range(merchants)),
        cfg.run_name,
        cfg.task_spec.num_labels,
    )
    if exact:
        with (run_dir / "exact-metrics.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in exact)
        print(format_table(exact), flush=True)
    return run_dir
