"""Which Flower apps this merchant runs: the merchant's approvals, checked by Flower's own FAB verification.

A Flower run brings its app from the coordinator as a FAB (a zip of the app's source), and the
SuperNode executes that app's ClientApp next to the merchant's data. The ledger, the budget and the
outgoing guard are part of the app, so a merchant that runs whatever a run brings runs whatever the
coordinator wants. The merchant therefore pins the exact bytes it reviewed:

- `fedbehavior merchant trust <app folder or .fab>` lists the files that will run and the FAB's
  SHA-256, and records the approval: an Ed25519 signature by the merchant's own approval key over that
  hash, in Flower's FAB-verification message format (`trust/approved-apps.json`).
- The SuperNode starts with `--trusted-entities trust/trusted-entities.yaml`, which names only the
  merchant's approval key. Flower then refuses every FAB that lacks a valid signature by that key
  over sha256(its content): the run gets an error reply and none of the app's code is executed.
- `client/daemon/supernode.py` (merchant-side code, not part of any FAB) attaches to each FAB fetched from
  the coordinator the merchant's stored signature for that content's hash, when there is one.

Why not Flower's publisher signatures: they vouch for whoever holds the publisher key, and the party
that builds and signs the app here is the coordinator, the adversary. Why a signature and not a
plain hash comparison: the decision is then made by Flower's verification of the bytes it is about
to run, and a missing or broken hook fails closed (Flower refuses every FAB).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shared.fileio import atomic_write_bytes, atomic_write_json
from shared.pki import load_approval_key, make_approval_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TRUST_DIR = "trust"
KEY_ID = "merchant-approval"  # the public-key id in trusted-entities.yaml and in a FAB's verifications
VALID_LICENSE = "valid_license"  # Flower's SuperNode refuses any FAB without this verification entry


def fab_message(sha256_hex: str, signed_at: int) -> bytes:
    """What an approval signs: Flower's canonical message (8-byte big-endian time + FAB digest)."""
    return signed_at.to_bytes(8, byteorder="big") + bytes.fromhex(sha256_hex)


@dataclass(frozen=True)
class AppFile:
    """One member of a FAB, as the ClientApp will see it once Flower unpacks the bundle."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class AppBundle:
    """The exact bytes of a Flower app bundle and where they came from."""

    content: bytes
    source: str

    @classmethod
    def load(cls, path: Path) -> AppBundle:
        """A FAB file as it is, or a folder built into a FAB the way `flwr run` builds it."""
        path = path.expanduser().resolve()
        if path.is_dir():
            from flwr.cli.build import build_fab_from_disk  # the merchant's Flower, not the coordinator's

            try:
                content = build_fab_from_disk(path)
            except (ValueError, FileNotFoundError) as err:
                raise ValueError(f"{path} is not a Flower app folder: {err}") from None
        elif path.is_file():
            content = path.read_bytes()
        else:
            raise FileNotFoundError(f"no app folder or .fab file at {path}")
        bundle = cls(content, str(path))
        bundle.app_name()  # fails early with a clear message if this is not a FAB
        return bundle

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    def files(self) -> list[AppFile]:
        """Every member of the zip, read from the bytes themselves (not from the FAB's own manifest)."""
        try:
            with zipfile.ZipFile(io.BytesIO(self.content)) as fab:
                return [
                    AppFile(info.filename, info.file_size, hashlib.sha256(fab.read(info)).hexdigest())
                    for info in fab.infolist()
                ]
        except zipfile.BadZipFile:
            raise ValueError(f"{self.source} is not a Flower app bundle (a .fab is a zip file)") from None

    def app_name(self) -> str:
        """`publisher/name==version` from the bundle's pyproject.toml."""
        names = {f.path for f in self.files()}
        if "pyproject.toml" not in names:
            raise ValueError(f"{self.source} has no pyproject.toml: it is not a Flower app bundle")
        with zipfile.ZipFile(io.BytesIO(self.content)) as fab:
            config = tomllib.loads(fab.read("pyproject.toml").decode("utf-8"))
        publisher = config.get("tool", {}).get("flwr", {}).get("app", {}).get("publisher", "?")
        project = config.get("project", {})
        return f"{publisher}/{project.get('name', '?')}=={project.get('version', '?')}"

    def describe(self) -> str:
        """The listing a merchant reviews before approving: every file, its size and hash, the FAB hash."""
        files = self.files()
        lines = [f"app {self.app_name()} from {self.source}", f"{len(files)} files:"]
        lines += [f"  {f.sha256[:16]}  {f.size:>9}  {f.path}" for f in files]
        lines.append(f"FAB sha256 {self.sha256} ({len(self.content)} bytes)")
        return "\n".join(lines)


@dataclass(frozen=True)
class Approval:
    """A merchant's signed statement: the FAB with this SHA-256 may run here."""

    sha256: str
    app: str
    source: str
    files: int
    approved_at: str
    signed_at: int
    signature: str  # base64url, Ed25519 over fab_message(sha256, signed_at)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Approval:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


class TrustStore:
    """A merchant's approvals (`<merchant>/trust/`): its key, the signed approvals, the trusted entity."""

    def __init__(self, merchant_dir: Path) -> None:
        self.folder = Path(merchant_dir) / TRUST_DIR

    @property
    def key_path(self) -> Path:
        return self.folder / "approval-key"

    @property
    def approvals_path(self) -> Path:
        return self.folder / "approved-apps.json"

    @property
    def entities_path(self) -> Path:
        return self.folder / "trusted-entities.yaml"

    def approvals(self) -> list[Approval]:
        try:
            data = json.loads(self.approvals_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{self.approvals_path} is not valid JSON ({err}); approve the app again"
            ) from None
        return [Approval.from_json(x) for x in data.get("approved", [])]

    def approve(self, bundle: AppBundle) -> Approval:
        """Sign `bundle`'s hash with this merchant's approval key (made on first use) and record it."""
        if not self.key_path.exists():
            make_approval_key(self.folder)
        key = load_approval_key(self.key_path)
        signed_at = int(time.time())
        signature = key.sign(fab_message(bundle.sha256, signed_at))
        approval = Approval(
            sha256=bundle.sha256,
            app=bundle.app_name(),
            source=bundle.source,
            files=len(bundle.files()),
            approved_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            signed_at=signed_at,
            signature=base64.urlsafe_b64encode(signature).decode("ascii").rstrip("="),
        )
        kept = [a for a in self.approvals() if a.sha256 != approval.sha256]
        self._write([*kept, approval])
        self.write_entities()
        return approval

    def revoke(self, sha256_prefix: str) -> list[Approval]:
        """Remove the approvals whose hash starts with `sha256_prefix` (at least 8 hex digits)."""
        if len(sha256_prefix) < 8:
            raise ValueError("give at least the first 8 hex digits of the app's sha256 (see --list)")
        approvals = self.approvals()
        gone = [a for a in approvals if a.sha256.startswith(sha256_prefix.lower())]
        self._write([a for a in approvals if a not in gone])
        return gone

    def _write(self, approvals: list[Approval]) -> None:
        atomic_write_json(self.approvals_path, {"approved": [asdict(a) for a in approvals]})

    def write_entities(self) -> Path:
        """`--trusted-entities` for the SuperNode: this merchant's approval key and nothing else."""
        public = (self.folder / "approval-key.pub").read_text(encoding="ascii").strip()
        # a JSON string is a valid YAML scalar: no YAML writer needed
        atomic_write_bytes(self.entities_path, f"{KEY_ID}: {json.dumps(public)}\n".encode("ascii"))
        return self.entities_path

    def verifications(self, content: bytes) -> dict[str, str]:
        """Flower FAB verifications for `content`: this merchant's signature if it approved these bytes.

        Without an approval only the entry that lets Flower's check run is returned, so Flower finds no
        signature by a trusted entity and refuses the FAB.
        """
        digest = hashlib.sha256(content).hexdigest()
        verifications = {VALID_LICENSE: "Valid"}
        for approval in self.approvals():
            if approval.sha256 == digest:
                entry = {"signature": approval.signature, "signed_at": approval.signed_at}
                verifications[KEY_ID] = json.dumps(entry)
        return verifications
