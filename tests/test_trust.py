"""The merchant runs only app code it approved: bundles, approvals, and Flower's own FAB verification.

The decisive checks call Flower's `_verify_fab` (what the SuperNode runs before it executes a FAB) with
the merchant's `trusted-entities.yaml`, so they hold for Flower's verifier, not only for ours.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.fab import Fab
from flwr.supernode import start_client_internal as flower
from flwr.supernode.start_client_internal import _verify_fab

from client.daemon import supernode
from client.daemon.control import Merchant, init_merchant
from client.daemon.trust import KEY_ID, VALID_LICENSE, AppBundle, TrustStore
from shared.cli import main
from tests.deploy_helpers import write_rogue_app


@pytest.fixture
def rogue(tmp_path: Path) -> Path:
    return write_rogue_app(tmp_path / "rogue")


def entities(store: TrustStore) -> dict[str, str]:
    loaded = yaml.safe_load(store.entities_path.read_text())  # the way flower-supernode reads it
    assert isinstance(loaded, dict)
    return loaded


def flower_accepts(store: TrustStore, content: bytes) -> bool:
    fab = Fab(hashlib.sha256(content).hexdigest(), content, store.verifications(content))
    return _verify_fab(fab, entities(store))


def test_bundle_lists_every_member_and_hashes_the_exact_bytes(rogue: Path, tmp_path: Path) -> None:
    bundle = AppBundle.load(rogue)
    content = build_fab_from_disk(rogue)  # what `flwr run rogue` submits
    assert bundle.content == content and bundle.sha256 == hashlib.sha256(content).hexdigest()
    with zipfile.ZipFile(io.BytesIO(content)) as fab:
        members = {n: hashlib.sha256(fab.read(n)).hexdigest() for n in fab.namelist()}
    assert {f.path: f.sha256 for f in bundle.files()} == members
    assert set(members) == {"pyproject.toml", "rogue_app.py", ".info/CONTENT"}
    text = bundle.describe()
    assert "rogue/rogueapp==1.0.0" in text and bundle.sha256 in text and "rogue_app.py" in text
    fab_file = tmp_path / "rogue.fab"
    fab_file.write_bytes(content)
    assert AppBundle.load(fab_file).sha256 == bundle.sha256  # the .fab and its folder: the same app
    (tmp_path / "notzip.fab").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a Flower app bundle"):
        AppBundle.load(tmp_path / "notzip.fab")
    empty = io.BytesIO()
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("x.py", "print(1)")
    (tmp_path / "nopyproject.fab").write_bytes(empty.getvalue())
    with pytest.raises(ValueError, match=r"no pyproject\.toml"):
        AppBundle.load(tmp_path / "nopyproject.fab")
    with pytest.raises(FileNotFoundError):
        AppBundle.load(tmp_path / "missing")


def test_flower_verifies_the_approved_bytes_and_nothing_else(rogue: Path, tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "m")
    bundle = AppBundle.load(rogue)
    assert store.verifications(bundle.content) == {VALID_LICENSE: "Valid"}  # nothing approved yet
    approval = store.approve(bundle)
    assert stat.S_IMODE(store.key_path.stat().st_mode) == 0o600
    assert list(entities(store)) == [KEY_ID] and entities(store)[KEY_ID].startswith("ssh-ed25519 ")
    assert approval.sha256 == bundle.sha256 and approval.files == 3
    assert flower_accepts(store, bundle.content)
    # one changed character in the ClientApp: another FAB, refused
    (rogue / "rogue_app.py").write_text((rogue / "rogue_app.py").read_text().replace("events", "event5"))
    changed = build_fab_from_disk(rogue)
    assert changed != bundle.content and not flower_accepts(store, changed)
    # another merchant's approval of the changed app does not count here
    other = TrustStore(tmp_path / "other")
    other.approve(AppBundle(changed, "x"))
    forged = Fab(hashlib.sha256(changed).hexdigest(), changed, other.verifications(changed))
    assert _verify_fab(forged, entities(other)) and not _verify_fab(forged, entities(store))
    # a tampered signature fails Flower's Ed25519 check
    entry = json.loads(store.verifications(bundle.content)[KEY_ID])
    sig = bytearray(base64.urlsafe_b64decode(entry["signature"] + "=="))
    sig[0] ^= 1
    entry["signature"] = base64.urlsafe_b64encode(bytes(sig)).decode().rstrip("=")
    tampered = {VALID_LICENSE: "Valid", KEY_ID: json.dumps(entry)}
    assert not _verify_fab(Fab(bundle.sha256, bundle.content, tampered), entities(store))


def test_fetched_fab_carries_the_merchants_approval_not_the_coordinators(
    rogue: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = TrustStore(tmp_path / "m")
    good = AppBundle.load(rogue)
    store.approve(good)
    copy = write_rogue_app(tmp_path / "rogue2")
    assert AppBundle.load(copy).sha256 == good.sha256  # the same files: the same approved app
    (copy / "extra.py").write_text("x = 1\n")  # one file more: another app
    bad = AppBundle.load(copy)
    # the coordinator sends its own "verification" claiming the merchant's key id: it is dropped
    claimed = {VALID_LICENSE: "Valid", KEY_ID: store.verifications(good.content)[KEY_ID]}
    served = {
        "good": Fab(good.sha256, good.content, {}),
        "bad": Fab(bad.sha256, bad.content, claimed),
        "misnamed": Fab(bad.sha256, good.content, {}),  # approved bytes under another FAB's name
    }

    def get_fab(fab_hash: str, run_id: int) -> Fab:
        return served[fab_hash]

    hooked = supernode.approving(get_fab, store)
    with caplog.at_level(logging.INFO, logger="flwr"):
        fabs = {name: hooked(name, run_id) for run_id, name in enumerate(served, start=7)}
    assert _verify_fab(fabs["good"], entities(store))
    assert fabs["bad"].verifications == {VALID_LICENSE: "Valid"}
    assert not _verify_fab(fabs["bad"], entities(store))
    assert fabs["misnamed"].verifications == {VALID_LICENSE: "Valid"}
    assert fabs["bad"].content == bad.content  # the bytes themselves are passed on untouched
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refusals) == 2
    assert "Refusing run 8" in refusals[0] and bad.sha256 in refusals[0] and "merchant trust" in refusals[0]
    assert "Refusing run 9" in refusals[1]
    store.approvals_path.write_text("{broken")
    with caplog.at_level(logging.ERROR, logger="flwr"):
        assert hooked("good", 10).verifications == {VALID_LICENSE: "Valid"}  # fails closed
    assert "cannot read" in caplog.records[-1].getMessage()


def test_install_wraps_get_fab_of_flowers_connection(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "m")

    def get_fab(fab_hash: str, run_id: int) -> Fab:
        return Fab(fab_hash, b"content", {"valid_license": "Valid", KEY_ID: "{}"})

    def other(*_: Any) -> None:
        return None

    @contextmanager
    def fake_connection(*_: Any, **__: Any) -> Iterator[tuple[Any, ...]]:
        yield (1, other, other, other, get_fab, other, other, other)

    monkeypatch.setattr(flower, "_init_connection", fake_connection)
    supernode.install(store)
    with flower._init_connection("127.0.0.1:1", True) as conn:
        assert conn[0] == 1 and conn[4] is not get_fab
        assert conn[4]("h", 1).verifications == {VALID_LICENSE: "Valid"}  # no approval: refused

    @contextmanager
    def changed_connection(*_: Any, **__: Any) -> Iterator[tuple[Any, ...]]:
        yield (1, other, other)  # a Flower whose connection has no get_fab: refuse to go on

    monkeypatch.setattr(flower, "_init_connection", changed_connection)
    supernode.install(store)
    with pytest.raises(RuntimeError, match="app-approval check"), flower._init_connection("h:1", True):
        pass
    with pytest.raises(SystemExit, match="--trusted-entities"):
        supernode.main(["--merchant-dir", str(tmp_path), "--superlink", "h:1"])


def test_trust_cli_revoke_and_start_refused_without_approval(
    rogue: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "m"
    init_merchant(folder, merchant_id="m", superlink="h:1", root_certificates=None, insecure=True)
    with pytest.raises(PermissionError, match="merchant trust"):
        Merchant.open(folder).supernode_command()
    assert main(["merchant", "start", str(folder), "--insecure"]) == 2
    assert "approved no Flower app" in capsys.readouterr().err
    assert main(["merchant", "trust", str(rogue), "--merchant-dir", str(tmp_path / "nothere"), "--yes"]) == 2
    monkeypatch.setattr("builtins.input", lambda _: "n")  # the merchant says no after the listing
    assert main(["merchant", "trust", str(rogue), "--merchant-dir", str(folder)]) == 1
    assert TrustStore(folder).approvals() == [] and "rogue_app.py" in capsys.readouterr().out
    assert main(["merchant", "trust", str(rogue), "--merchant-dir", str(folder), "--yes"]) == 0
    out = capsys.readouterr().out
    sha = AppBundle.load(rogue).sha256
    assert sha in out and "rogue_app.py" in out and "approved rogue/rogueapp==1.0.0" in out
    cmd = Merchant.open(folder).supernode_command()
    assert cmd[1:4] == ["-I", "-m", "client.daemon.supernode"]
    assert cmd[cmd.index("--trusted-entities") + 1] == str(folder / "trust" / "trusted-entities.yaml")
    assert main(["merchant", "trust", "--list", "--merchant-dir", str(folder)]) == 0
    assert sha in capsys.readouterr().out
    with pytest.raises(ValueError, match="8 hex digits"):
        TrustStore(folder).revoke(sha[:4])
    assert main(["merchant", "trust", "--revoke", sha[:12], "--merchant-dir", str(folder)]) == 0
    assert TrustStore(folder).approvals() == []


def test_coordinator_build_writes_the_bytes_flwr_run_submits(
    rogue: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "coord"
    home.mkdir()
    (home / "coordinator.toml").write_text(f"app = {json.dumps(str(rogue))}\n")
    out = tmp_path / "app.fab"
    assert main(["coordinator", "--home", str(home), "build", "--out", str(out)]) == 0
    assert out.read_bytes() == build_fab_from_disk(rogue)
    assert hashlib.sha256(out.read_bytes()).hexdigest() in capsys.readouterr().out
