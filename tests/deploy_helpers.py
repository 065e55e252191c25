"""A real deployment on 127.0.0.1 for tests: one SuperLink and SuperNode processes, TLS and auth on."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from client.daemon.control import Merchant, init_merchant
from client.daemon.trust import AppBundle
from server.deploy import CoordinatorHome, app_dir
from shared.daemon import free_port
from shared.pki import DevCertificates, make_dev_certificates
from simulations.synthetic import generate_merchant


class Deployment:
    """Coordinator home, certificates and merchant folders under `root`; every process tracked."""

    def __init__(
        self, root: Path, *, customers: int = 60, edit_app: Callable[[Path], None] | None = None
    ) -> None:
        self.root = root
        self.customers = customers
        self.certs: DevCertificates = make_dev_certificates(
            root / "coord" / "certs", ["localhost", "127.0.0.1"]
        )
        self.port = free_port()
        home = root / "coord"
        # the coordinator runs a frozen copy of the project's app, the one every merchant approves:
        # the source tree may change while the tests run, the approved bytes must not
        frozen = root / "app" / "fedbehavior"
        self.app = snapshot_app(app_dir(), frozen)
        if edit_app is not None:  # a test's variant of the app: the coordinator runs it, merchants approve it
            edit_app(frozen)
            self.app = AppBundle.load(frozen)
        (home / "coordinator.toml").write_text(
            f'host = "127.0.0.1"\nport = {self.port}\napp = {json.dumps(str(frozen))}\n', encoding="utf-8"
        )
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
        trust: bool = True,
        backbones: tuple[str, ...] = (),
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
        if backbones:  # the merchant approves these backbones besides the packaged one ([policy])
            toml = folder / "merchant.toml"
            listed = ", ".join(json.dumps(b) for b in ("", *backbones))
            text = toml.read_text(encoding="utf-8").replace('backbones = [""]', f"backbones = [{listed}]", 1)
            toml.write_text(text, encoding="utf-8")
        if max_wait_s is not None:
            with (folder / "merchant.toml").open("a", encoding="utf-8") as handle:
                handle.write(f"max-wait-s = {max_wait_s}\n")  # appended to the [daemon] table
        if register and not insecure and settings.daemon.private_key is not None:
            self.coordinator.register(settings.daemon.private_key.with_suffix(".pub"), name=name)
        merchant = Merchant.open(folder)
        if trust:
            merchant.trust.approve(self.app)
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


def snapshot_app(source: Path, dest: Path) -> AppBundle:
    """Unpack the FAB of `source` into `dest`; `flwr run dest` then submits exactly these bytes."""
    bundle = AppBundle.load(source)
    with zipfile.ZipFile(io.BytesIO(bundle.content)) as fab:
        for name in fab.namelist():
            if not name.startswith(".info/"):  # Flower's manifest, rebuilt by every build
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                (dest / name).write_bytes(fab.read(name))
    return bundle


ROGUE_PYPROJECT = """[project]
name = "rogueapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "rogue"

[tool.flwr.app.components]
serverapp = "rogue_app:server"
clientapp = "rogue_app:client"

[tool.flwr.app.config]
out-file = ""
nodes = 1
"""

# A coordinator's own app: its ClientApp reads the merchant's events file and sends it back; its
# ServerApp writes every reply (content or error) to `out-file`.
ROGUE_APP = """import json, time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def steal(msg: Message, context: Context) -> Message:
    events = Path(str(context.node_config["merchant-dir"])) / "events.jsonl"
    return Message(RecordDict({"loot": ConfigRecord({"rows": events.read_text()})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    wanted = int(context.run_config["nodes"])
    deadline = time.monotonic() + 60
    while len(list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(1)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in grid.get_node_ids()]
    replies = []
    for reply in grid.send_and_receive(messages, timeout=120):
        entry = {"node": reply.metadata.src_node_id, "error": None, "content": None}
        if reply.has_error():
            entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
        else:
            entry["content"] = {k: dict(v) for k, v in reply.content.config_records.items()}
        replies.append(entry)
    Path(str(context.run_config["out-file"])).write_text(json.dumps(replies))
"""


def write_rogue_app(folder: Path) -> Path:
    """A minimal Flower app whose ClientApp exfiltrates the merchant's raw events."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(ROGUE_PYPROJECT, encoding="utf-8")
    (folder / "rogue_app.py").write_text(ROGUE_APP, encoding="utf-8")
    return folder
