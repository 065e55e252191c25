"""A real deployment on 127.0.0.1 for tests: one SuperLink and SuperNode processes, TLS and auth on."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psutil

from client.daemon import Merchant, init_merchant
from server.deploy import CoordinatorHome
from shared.daemon import free_port
from shared.pki import DevCertificates, make_dev_certificates
from simulations.generator import generate_merchant


class Deployment:
    """Coordinator home, certificates and merchant folders under `root`; every process tracked."""

    def __init__(self, root: Path, *, customers: int = 60) -> None:
        self.root = root
        self.customers = customers
        self.certs: DevCertificates = make_dev_certificates(
            root / "coord" / "certs", ["localhost", "127.0.0.1"]
        )
        self.port = free_port()
        home = root / "coord"
        (home / "coordinator.toml").write_text(f'host = "127.0.0.1"\nport = {self.port}\n', encoding="utf-8")
        self.coordinator = CoordinatorHome.open(home)
        self.merchants: dict[str, Merchant] = {}
        self.pids: set[int] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_coordinator(self) -> None:
        self.pids.add(self.coordinator.start())

    def add_merchant(
        self,
        name: str,
        index: int,
        *,
        register: bool = True,
        root_certificates: Path | None = None,
        max_epsilon: float = 50.0,
        max_wait_s: float | None = None,
        insecure: bool = False,
    ) -> Merchant:
        folder = self.root / name
        generate_merchant(7, index, folder, base_customers=self.customers)
        (folder / "merchant.json").unlink()  # the daemon's merchant.toml is the settings file
        settings = init_merchant(
            folder,
            merchant_id=name,
            superlink=self.address,
            root_certificates=root_certificates or self.certs.ca_cert,
            max_epsilon=max_epsilon,
            runtime_port=free_port(),
            insecure=insecure,
        )
        if max_wait_s is not None:
            with (folder / "merchant.toml").open("a", encoding="utf-8") as handle:
                handle.write(f"max-wait-s = {max_wait_s}\n")  # appended to the [daemon] table
        if register and not insecure and settings.daemon.private_key is not None:
            self.coordinator.register(settings.daemon.private_key.with_suffix(".pub"), name=name)
        merchant = Merchant.open(folder)
        self.merchants[name] = merchant
        return merchant

    def start_merchant(self, name: str) -> int:
        pid = self.merchants[name].start()
        self.pids.add(pid)
        return pid

    def online(self) -> int:
        return sum(1 for n in self.coordinator.merchants() if n.get("status") == "online")

    def wait_online(self, count: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while self.online() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.online()} of {count} merchants online after {timeout:.0f} s")
            time.sleep(1.0)

    def ledger(self, name: str) -> dict[str, Any]:
        path = self.merchants[name].settings.ledger_path
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"history": []}

    def shutdown(self) -> list[int]:
        """Stop everything; return pids that survived (should be none)."""
        for merchant in self.merchants.values():
            merchant.stop()
        self.coordinator.stop()
        time.sleep(0.5)
        return [
            p
            for p in self.pids
            if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} not seen after {timeout:.0f} s")
