"""Local simulation: N synthetic merchants and the coordinator on one machine (Flower + Ray).

The merchants' data is generated into `<run>/merchants/merchant-<i>/` first; each simulated client
then reads its own folder through the same code path as a deployed merchant daemon.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.settings import MerchantSettings
from server.app import build_server_app, resolve_paths
from server.metrics import MetricsLog
from shared.config import RunConfig
from simulations.exact import exact_rounds, format_table
from simulations.synthetic import ensure_merchant

if TYPE_CHECKING:
    from flwr.app import Context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulatedMerchants:
    """The simulation's merchants, as the ClientApp's `settings_of`: Flower numbers its virtual
    nodes (`partition-id`), and node i is the merchant folder `<root>/merchant-i`, prepared before the
    run (`simulate`). The simulation owns these merchants, so their policy admits its backbone; a
    deployed merchant's policy stays its own (`client.app.node_settings`)."""

    root: Path
    backbone: str

    def __call__(self, context: Context) -> MerchantSettings:
        if "partition-id" not in context.node_config:
            raise ValueError("a simulated merchant's node has a partition-id; this one has none")
        folder = self.root / f"merchant-{int(context.node_config['partition-id'])}"
        settings = MerchantSettings.from_merchant_dir(folder)
        policy = settings.policy
        backbones = policy.model_copy(update={"backbones": (*policy.backbones, self.backbone)})
        return settings.model_copy(update={"policy": backbones})


def simulate(
    overrides: Mapping[str, Any],
    *,
    merchants: int = 4,
    cpus_per_merchant: float = 1.0,
    gpus_per_merchant: float = 0.0,
    ray_address: str | None = None,
) -> Path:
    """Run a local simulation; return the run folder. Raises if the run did not complete.

    `ray_address`: an existing Ray cluster to run the merchants on (`auto`, or the head's
    `host:port` as `ray start --head` prints it; every node needs this project installed and the
    merchants' folders, `sim-root`, on a shared path). None: a private Ray instance on this machine
    (also from the RAY_ADDRESS environment variable, as Ray itself reads it)."""
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

    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from client.app import build_client_app

    # Flower logs through its own console handler; without this its DEBUG records also reach ours.
    logging.getLogger("flwr").propagate = False

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    # joining a cluster: its nodes say what they have (Ray refuses num_cpus with an address)
    init_args: dict[str, Any] = (
        {"address": address} if address else {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
    )
    if address:
        log.info("simulating %d merchants on the Ray cluster at %s", merchants, address)
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": cpus_per_merchant, "num_gpus": gpus_per_merchant},
        "init_args": init_args,
    }
    # Flower 1.41's engine behind `run_simulation`, minus its notice that the Python entry point is
    # deprecated in favour of `flwr run` (which needs a SuperLink and a built app for every study).
    # flwr is pinned to 1.41.0 (pyproject), so this private name cannot move under us unnoticed;
    # tests/test_simulation_e2e.py runs it.
    _run_simulation(
        num_supernodes=merchants,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=build_client_app(SimulatedMerchants(Path(cfg.sim_root), cfg.backbone)),
        server_app=build_server_app(cfg.to_record(), announce=False),
        backend_config=backend,  # type: ignore[arg-type]
    )
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
