"""The app merchants approve holds only the apps' own source (issue 21): an export or notes written
inside the checkout leave its hash, and so every merchant's approval, unchanged."""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

ROOT = Path(__file__).resolve().parent.parent


def test_files_written_into_the_checkout_leave_the_app_hash_unchanged(tmp_path: Path) -> None:
    app = tmp_path / "app"
    for name in ("client", "server", "shared"):
        shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", ".gitignore", "README.md"):
        shutil.copy(ROOT / name, app / name)
    before = build_fab_from_disk(app)
    # what the README's own commands write into a checkout: an exported model, a run folder, notes
    (app / "model").mkdir()
    (app / "model" / "adapter_config.json").write_text("{}")
    (app / "model" / "README.md").write_text("model card")
    (app / "runs" / "demo").mkdir(parents=True)
    (app / "runs" / "demo" / "metrics.jsonl").write_text("{}\n")
    (app / "scratch.py").write_text("print('a user script')\n")
    after = build_fab_from_disk(app)
    assert hashlib.sha256(after).hexdigest() == hashlib.sha256(before).hexdigest()
    names = zipfile.ZipFile(io.BytesIO(after)).namelist()
    assert "client/app.py" in names and "server/app.py" in names and "shared/protocol.py" in names
    assert all(
        n.startswith(("client/", "server/", "shared/")) or n in ("pyproject.toml", ".info/CONTENT")
        for n in names
    )
    # the simulation's synthetic shops are not part of what a merchant runs
    assert not [n for n in names if "synthetic" in n or "catalog" in n]
