"""The merchant's daemon: a Flower SuperNode next to the merchant's data.

`init_merchant` prepares a merchant folder (key pair + merchant.toml); `Merchant.start` launches the
SuperNode with the merchant folder in its node config, so every ClientApp it runs reads this
merchant's settings and data locally. The SuperNode runs only apps the merchant approved with
`fedbehavior merchant trust` (`client/daemon/trust.py`, `client/daemon/supernode.py`); it does not start
without one.
With `[daemon] warm-executor = true` (the default) it runs with `--isolation process` and its launcher
starts the merchant's warm executor as its child (`client/daemon/warm_exec.py`): each message is answered in
a fork of a process that has the libraries imported already; stopping the daemon stops both.
The SuperNode reconnects by itself when the coordinator goes away and comes back; the ledger in
`state/` survives restarts of either side.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from client.daemon.trust import TrustStore
from client.settings import TOML_FILE, MerchantSettings
from shared.daemon import Daemon, flower_env
from shared.pki import check_secret_permissions, make_merchant_keys

INSECURE_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! INSECURE MODE: this merchant talks to the coordinator in plaintext, without checking who the   !!
!! coordinator is and without authenticating itself. Development only.                            !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""

TEMPLATE = """# fedbehavior merchant settings (written by `fedbehavior merchant init`).
# Environment variables FEDBEHAVIOR_MERCHANT_<KEY> override these (e.g. FEDBEHAVIOR_MERCHANT_MAX_EPSILON=4;
# FEDBEHAVIOR_MERCHANT_DAEMON__SUPERLINK=host:port). Relative paths are relative to this file's folder.

merchant-id = {merchant_id}
# Your privacy budget: training stops for good once this epsilon would be exceeded.
max-epsilon = {max_epsilon}
delta = {delta}
# Events (events.jsonl or an ingested store/) and the privacy ledger.
data-dir = "."
state-dir = "state"
# The public size of your training set: DP-SGD's sampling rate, steps and noise come from it, never
# from the exact count. Unset: a noisy estimate of it, charged once per run.
# declared-customers = 5000
# Caps you count yourself, whatever run keys a coordinator sends (per calendar window).
budget-window-days = 30.0
max-runs-per-window = 20
# max-epsilon-per-window = 2.0
# max-epsilon-per-run = 1.0

# What a coordinator's run plan may ask of you; a run's plan is pinned at its first message.
[policy]
tasks = ["purchase-intent", "next-behavior", "category-intent", "customer-label", "repeat-purchase"]
eval-splits = ["customer", "time"]
backbones = [""]  # "" = the packaged MiniLM-L6; list any other Hugging Face id or folder you approve
max-rounds = 50
max-local-epochs = 20
max-batch-size = 4096
max-learning-rate = 10.0
max-examples-per-customer = 64
max-adapter-norm = 10000.0

[daemon]
superlink = {superlink}
{root_line}
{key_line}
insecure = {insecure}
runtime-port = {runtime_port}
# Answer each message in a fork of a process that has torch & co. imported already (seconds, not
# ~10 s, per message); false: a fresh Flower process per message.
warm-executor = true
"""


def _toml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def init_merchant(
    folder: Path,
    *,
    merchant_id: str,
    superlink: str,
    root_certificates: Path | None,
    max_epsilon: float = 8.0,
    delta: float = 1e-6,
    insecure: bool = False,
    runtime_port: int = 9094,
) -> MerchantSettings:
    """Create `merchant.toml` and (unless insecure) an authentication key pair in `folder/keys/`."""
    folder = folder.expanduser().resolve()
    path = folder / TOML_FILE
    if path.exists():
        raise FileExistsError(f"{path} exists already; edit it, or init another folder")
    if not insecure:
        if root_certificates is None:
            raise ValueError(
                "give --root-certificates (the coordinator's CA certificate, ca.crt) or, for a "
                "development try-out only, --insecure"
            )
        root_certificates = root_certificates.expanduser().resolve()
        if not root_certificates.exists():
            raise FileNotFoundError(
                f"no CA certificate at {root_certificates}; ask the coordinator for ca.crt"
            )
    folder.mkdir(parents=True, exist_ok=True)
    keys = None if insecure else make_merchant_keys(folder / "keys")
    text = TEMPLATE.format(
        merchant_id=_toml_str(merchant_id),
        max_epsilon=float(max_epsilon),
        delta=float(delta),
        superlink=_toml_str(superlink),
        root_line=(
            f"root-certificates = {_toml_str(str(root_certificates))}"
            if root_certificates
            else '# root-certificates = "ca.crt"'
        ),
        key_line=(
            "# private-key: never share it; send keys/supernode.pub to the coordinator\n"
            f"private-key = {_toml_str(str(keys.private_key.relative_to(folder)))}"
            if keys
            else '# private-key = "keys/supernode"'
        ),
        insecure=str(insecure).lower(),
        runtime_port=int(runtime_port),
    )
    path.write_text(text, encoding="utf-8")
    return MerchantSettings.from_merchant_dir(folder)


@dataclass(frozen=True)
class Merchant:
    folder: Path
    settings: MerchantSettings

    @classmethod
    def open(cls, folder: Path) -> Merchant:
        folder = folder.expanduser().resolve()
        if not (folder / TOML_FILE).exists():
            raise FileNotFoundError(
                f"no {TOML_FILE} in {folder}: create it with `fedbehavior merchant init {folder} "
                f"--merchant-id <name> --superlink <host:port> --root-certificates <ca.crt>`"
            )
        return cls(folder, MerchantSettings.from_merchant_dir(folder))

    @property
    def supernode(self) -> Daemon:
        return Daemon("supernode", self.settings.state_dir)

    @property
    def trust(self) -> TrustStore:
        return TrustStore(self.folder)

    def trusted_entities(self) -> Path:
        """The `--trusted-entities` file; refuses when no app is approved (every run would be refused)."""
        if not self.trust.approvals():
            raise PermissionError(
                f"{self.folder} has approved no Flower app, so its SuperNode would refuse every run. Review "
                f"the coordinator's app and approve it: fedbehavior merchant trust <app folder or .fab> "
                f"--merchant-dir {self.folder}"
            )
        return self.trust.write_entities()

    def supernode_command(self) -> list[str]:
        d = self.settings.daemon
        node_config = f"merchant-dir={_toml_str(str(self.folder))}"
        cmd = [
            # the merchant's own launcher around Flower's SuperNode; -I: no working folder on sys.path
            sys.executable,
            "-I",
            "-m",
            "client.daemon.supernode",
            "--merchant-dir",
            str(self.folder),
            "--trusted-entities",
            str(self.trusted_entities()),
            "--superlink",
            d.superlink,
            "--node-config",
            node_config,
            # process: the launcher starts the merchant's warm executor beside Flower's SuperNode
            "--isolation",
            "process" if d.warm_executor else "subprocess",
            "--port",
            str(d.runtime_port),
        ]
        if d.max_wait_s is not None:
            cmd += ["--max-wait-time", str(d.max_wait_s)]
        if d.insecure:
            return [*cmd, "--insecure"]
        if d.root_certificates is None or not d.root_certificates.exists():
            raise FileNotFoundError(
                f"root-certificates {d.root_certificates} not found: set [daemon] root-certificates in "
                f"{self.folder / TOML_FILE} to the coordinator's CA certificate"
            )
        if d.private_key is None or not d.private_key.exists():
            raise FileNotFoundError(
                f"private key {d.private_key} not found: `fedbehavior merchant init` creates one, or set "
                f"[daemon] private-key in {self.folder / TOML_FILE}"
            )
        check_secret_permissions(d.private_key)
        cmd += ["--root-certificates", str(d.root_certificates)]
        cmd += ["--auth-supernode-private-key", str(d.private_key)]
        return cmd

    def start(self) -> int:
        if self.settings.daemon.insecure:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)
        return self.supernode.start(self.supernode_command(), env=self.env())

    def env(self) -> dict[str, str]:
        return flower_env(self.settings.state_dir / "flwr")

    def stop(self) -> bool:
        return self.supernode.stop()
