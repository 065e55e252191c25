"""A real deployment on loopback: SuperLink + three SuperNode processes, TLS and merchant authentication.

The tests of this module share one deployment and run in file order: security refusals first (before
the merchants join), then a coordinator's rogue app refused by every merchant, then a two-round run
of the project's own (approved) app, then faults (a merchant SIGKILLed mid-round; the coordinator
SIGKILLed mid-run and resumed, with one merchant whose budget is spent).
"""

from __future__ import annotations

import itertools
import json
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.daemon.trust import AppBundle
from server.audit import audit_problems, read_audit
from server.deploy import run_summary
from shared.adapters import AdapterSpec, extract_adapter
from shared.config import RunConfig
from shared.model import build_model
from shared.pki import make_dev_certificates
from shared.privacy import Charge, epsilon_of
from tests.deploy_helpers import Deployment, wait_for, write_rogue_app

pytestmark = pytest.mark.slow

SHOPS = ("shop-a", "shop-b", "shop-c")
RUN_TIMEOUT = 900.0


def run_config(tiny_bert: str, **extra: Any) -> dict[str, Any]:
    return {
        "backbone": tiny_bert,
        "num-rounds": 2,
        "min-train-nodes": 2,
        "min-evaluate-nodes": 2,
        "min-available-nodes": 3,
        "batch-size": 16,
        "max-length": 32,
        "lora-r": 2,
        "noise-multiplier": 1.0,  # a fixed σ: each run spends part of the budget, several runs fit
        **extra,
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("deploy"))
    d.start_coordinator()
    for index, name in enumerate(SHOPS):
        d.add_merchant(
            name, index, backbones=(tiny_bert,)
        )  # each merchant's policy lists the test's backbone
    try:
        yield d
    finally:
        survivors = d.shutdown()
        assert survivors == [], f"processes left running: {survivors}"


def rows_of(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


TRAIN_CLIP = RunConfig().max_grad_norm
"""The run's clip, which a training charge records; a release (an evaluation, the size estimate) records
its sensitivity, 1. The sample rate cannot tell them apart: a merchant whose public size is at most the
batch size trains at q = 1."""
assert TRAIN_CLIP != 1.0


def training_charges(ledger: dict[str, Any], run: str) -> list[dict[str, Any]]:
    """The ledger's training charges of `run` (the ledger names the merchant's own run record,
    "<number>-<run key>")."""
    return [
        h for h in ledger["history"] if h["run_id"].endswith(f"-{run}") and h["max_grad_norm"] == TRAIN_CLIP
    ]


def epsilons(ledger: dict[str, Any]) -> list[float]:
    """ε after each charge, recomputed from the ledger's history (independently of its own total)."""
    history = [Charge.from_json(h) for h in ledger["history"]]
    return [epsilon_of(history[: i + 1], ledger["delta"]) for i in range(len(history))]


# ---------------------------------------------------------------------------------------- security


def test_intruders_are_refused(deployment: Deployment) -> None:
    d = deployment
    other_ca = make_dev_certificates(d.root / "other-ca", ["localhost", "127.0.0.1"])
    d.add_merchant("wrong-ca", 0, root_certificates=other_ca.ca_cert, max_wait_s=6)  # key registered
    d.add_merchant("unregistered", 1, register=False, max_wait_s=6)
    d.add_merchant("plaintext", 2, insecure=True, max_wait_s=6)
    intruders = ("wrong-ca", "unregistered", "plaintext")
    for name in intruders:
        d.start_merchant(name)
    for name in intruders:  # each gives up and exits: the SuperLink never let it in
        wait_for(lambda n=name: d.merchants[n].supernode.pid() is None, 90, f"{name} to exit")
    logs = {n: d.merchants[n].supernode.log_file.read_text(errors="replace") for n in intruders}
    assert "CERTIFICATE_VERIFY_FAILED" in logs["wrong-ca"]
    assert "Failed to activate SuperNode" in logs["unregistered"]
    assert "could not establish a connection" in logs["plaintext"]
    assert d.online() == 0
    for name in intruders:
        del d.merchants[name]


def test_private_keys_owner_only_and_never_logged(deployment: Deployment) -> None:
    d = deployment
    keys = [d.certs.ca_key, d.certs.server_key]
    for name in SHOPS:  # each merchant's authentication key and app-approval key
        auth_key = d.merchants[name].settings.daemon.private_key
        assert auth_key is not None
        keys += [auth_key, d.merchants[name].trust.key_path]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    # the base64 body of every private key appears in no log, settings or run file
    secrets = [line for k in keys for line in k.read_text().splitlines() if "PRIVATE KEY" not in line]
    texts = [p.read_text(errors="replace") for p in d.root.rglob("*.log")]
    texts += [p.read_text() for p in d.root.rglob("*.toml")]
    assert secrets and texts
    assert not any(s in t for s in secrets for t in texts)


# ---------------------------------------------------------------------------------------- merchants join


@pytest.fixture(scope="module")
def online(deployment: Deployment) -> Deployment:
    for name in SHOPS:
        deployment.start_merchant(name)
    deployment.wait_online(3)
    return deployment


# ---------------------------------------------------------------------------------------- trusted code


def run_rogue(d: Deployment, name: str) -> tuple[int, list[dict[str, Any]]]:
    """Submit the rogue app as the coordinator would (`flwr run`); return its run id and replies."""
    out = d.coordinator.folder / f"{name}-replies.json"
    overrides = d.root / f"{name}.toml"
    overrides.write_text(f"out-file = {json.dumps(str(out))}\nnodes = {len(SHOPS)}\n")
    answer = d.coordinator.flwr("run", str(d.root / "rogue"), "--run-config", str(overrides))
    run_id = int(answer["run-id"])
    wait_for(lambda: d.coordinator.flower_status(run_id).startswith("finished"), 240, f"rogue run {run_id}")
    return run_id, json.loads(out.read_text()) if out.exists() else []


def test_rogue_app_is_refused_and_no_data_leaves(online: Deployment) -> None:
    d = online
    rogue = AppBundle.load(write_rogue_app(d.root / "rogue"))
    rows = {n: (d.merchants[n].folder / "events.jsonl").read_text().splitlines()[:50] for n in SHOPS}
    run_id, replies = run_rogue(d, "rogue")
    assert len(replies) == len(SHOPS)
    assert all(
        r["content"] is None and r["error"]["reason"] == "The FAB could not be verified." for r in replies
    )
    coordinator_files = [p.read_bytes() for p in d.coordinator.folder.rglob("*") if p.is_file()]
    assert not any(row.encode() in blob for rs in rows.values() for row in rs for blob in coordinator_files)
    for name in SHOPS:  # each merchant logged why, and never unpacked the app
        log = d.merchants[name].supernode.log_file.read_text(errors="replace")
        assert f"Refusing run {run_id}: its app (FAB sha256 {rogue.sha256}" in log
        assert not list((d.merchants[name].settings.state_dir / "flwr").rglob("rogue_app.py"))
    # control: once shop-a approves this app, the same run does take shop-a's rows (the others still refuse)
    d.merchants["shop-a"].trust.approve(rogue)
    try:
        _, replies = run_rogue(d, "rogue-approved")
    finally:
        d.merchants["shop-a"].trust.revoke(rogue.sha256)
    loot = [r["content"]["loot"]["rows"] for r in replies if r["content"]]
    assert len(loot) == 1 and all(row in loot[0] for row in rows["shop-a"])
    assert sum(r["content"] is None for r in replies) == len(SHOPS) - 1


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def e2e(online: Deployment, tiny_bert: str) -> tuple[Any, str]:
    d = online
    launch = d.coordinator.launch(run_config(tiny_bert, **{"min-train-nodes": 3}), name="e2e")
    return launch, d.coordinator.wait(launch, RUN_TIMEOUT)


def test_two_rounds_over_tls_with_authentication(e2e: tuple[Any, str], deployment: Deployment) -> None:
    launch, status = e2e
    assert status == "finished:completed"
    rows = rows_of(launch.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert {m: v["status"] for m, v in row["merchants"].items()} == dict.fromkeys(SHOPS, "trained")
    assert (launch.run_dir / "final" / "adapter_model.safetensors").exists()
    for name in SHOPS:
        # the merchant's own run record for the coordinator's run "e2e"
        charges = [h for h in deployment.ledger(name)["history"] if h["run_id"].endswith("-e2e")]
        # training rounds 1, 2; the evaluations of rounds 0, 1, 2 and the run's size estimate at its
        # first training round (Gaussian mechanisms of sensitivity 1, sample rate 1)
        assert [c["round"] for c in charges if c["max_grad_norm"] == TRAIN_CLIP] == [1, 2]
        releases = [c for c in charges if c["max_grad_norm"] == 1.0]
        assert [c["round"] for c in releases] == [0, 1, 1, 2] and {c["sample_rate"] for c in releases} == {
            1.0
        }
    summary = run_summary(launch.run_dir)
    assert summary["round"] == 2 and summary["final"]
    assert set(summary["merchants"]) == set(SHOPS)


def test_every_message_a_merchant_sent_is_audited(e2e: tuple[Any, str], tiny_bert: str) -> None:
    launch, _ = e2e
    cfg = RunConfig.parse(run_config(tiny_bert))
    model = build_model(tiny_bert, num_labels=cfg.task_spec.num_labels, lora=cfg.lora, pooling=cfg.pooling)
    spec = AdapterSpec.of(model)
    expected = {k: tuple(v.shape) for k, v in extract_adapter(model).items()}
    entries = read_audit(launch.run_dir)
    train = [e for e in entries if e["message_type"] == "train"]
    evaluate = [e for e in entries if e["message_type"] == "evaluate"]
    assert len(train) == 3 * 2 and len(evaluate) == 3 * 3  # 3 merchants; 2 rounds; evaluation of 0, 1, 2
    assert audit_problems(entries, expected) == []
    for e in train:  # each trained reply carries exactly the adapter, as float32 values
        assert set(e["records"]) == {"arrays", "metrics", "status", "privacy"}
        assert sum(t["value_bytes"] for t in e["records"]["arrays"]["tensors"].values()) == spec.num_bytes
    for e in evaluate:
        assert "arrays" not in e["records"]
    # no merchant text travels: every string sent is a status word, a merchant id, or empty
    strings = {
        v
        for e in entries
        for r in e["records"].values()
        if r["type"] == "config"
        for v in r["values"].values()
    }
    # (and the ledger's accountant and privacy unit, words of a fixed vocabulary)
    assert strings <= {"trained", "evaluated", "", *SHOPS, "pld", "customer"}
    sent = {(e["round"], e["records"]["status"]["values"]["merchant-id"]): e["bytes"] for e in train}
    rows = rows_of(launch.run_dir)
    assert {(r["round"], m): v["bytes_up"] for r in rows[1:] for m, v in r["merchants"].items()} == sent


# ---------------------------------------------------------------------------------------- faults


def test_merchant_killed_mid_round_rejoins_and_its_ledger_continues(
    e2e: tuple[Any, str], deployment: Deployment, tiny_bert: str
) -> None:
    d = deployment
    victim = "shop-c"
    before = epsilons(d.ledger(victim))
    # a round waits at most 150 s for replies (Flower itself reports a silent merchant after ~3 min)
    # three local epochs: the victim's training lasts long enough to be killed in the middle of it
    launch = d.coordinator.launch(
        run_config(tiny_bert, **{"round-timeout": 150.0, "local-epochs": 3}), name="crash"
    )

    def charged() -> bool:  # the training charge of round 1 (round 0's evaluation is charged too)
        return bool(training_charges(d.ledger(victim), "crash"))

    wait_for(charged, 300, f"{victim} to charge its ledger for round 1", poll=0.05)
    d.merchants[victim].supernode.kill()  # SIGKILL the SuperNode and its ClientApp mid-round
    crash_ledger = d.ledger(victim)
    at_crash = epsilons(crash_ledger)

    def round1_trained() -> list[dict[str, Any]]:
        return [e for e in read_audit(launch.run_dir) if e["round"] == 1 and e["message_type"] == "train"]

    # the round's training ends without the victim (timed out, or reported gone by the SuperLink)
    replies = wait_for(lambda: len(round1_trained()) == 3 and round1_trained(), 400, "round 1 replies")
    assert sum("error" in e or "missing" in e for e in replies) == 1
    d.start_merchant(victim)  # the daemon restarts and rejoins; the next sampling waits for 3 merchants
    assert d.coordinator.wait(launch, RUN_TIMEOUT) == "finished:completed"

    rows = rows_of(launch.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    round1 = {m: v["status"] for m, v in rows[1]["merchants"].items()}
    assert round1.pop("shop-a") == "trained" and round1.pop("shop-b") == "trained"
    # rejoined in time for round 1's evaluation, the victim is listed by name for that charge
    assert round1.pop(victim, "evaluated") == "evaluated"
    assert list(round1.values()) == ["failed"]  # its failed training, known only by its node id
    assert rows[2]["merchants"][victim]["status"] == "trained"
    after_ledger = d.ledger(victim)
    after = epsilons(after_ledger)
    assert after[: len(at_crash)] == at_crash  # the charge made before the crash stayed charged
    assert len(at_crash) > len(before)
    assert len(training_charges(crash_ledger, "crash")) == 1
    assert len(training_charges(after_ledger, "crash")) == 2  # round 1 (before the crash) and round 2
    assert all(b >= a for a, b in itertools.pairwise(after))  # ε never decreases


def test_coordinator_killed_mid_run_resumes_and_spent_budget_is_refused(
    e2e: tuple[Any, str], deployment: Deployment, tiny_bert: str
) -> None:
    d = deployment
    # shop-a spends no more: its max-epsilon drops to what it has already spent
    toml = d.merchants["shop-a"].folder / "merchant.toml"
    spent = d.ledger("shop-a")["epsilon"]
    toml.write_text(re.sub(r"(?m)^max-epsilon = .*$", f"max-epsilon = {spent + 1e-3}", toml.read_text()))
    # the others have room for this run whatever the module's earlier runs spent (each run's DP size
    # estimate varies, so a fixed budget of 50 was sometimes nearly used up by now)
    for name in ("shop-b", "shop-c"):
        other = d.merchants[name].folder / "merchant.toml"
        room = d.ledger(name).get("epsilon", 0.0) + 40.0
        other.write_text(re.sub(r"(?m)^max-epsilon = .*$", f"max-epsilon = {room}", other.read_text()))
    launch = d.coordinator.launch(run_config(tiny_bert), name="resume")
    wait_for(lambda: len(rows_of(launch.run_dir)) >= 2, 400, "round 1 of the run")
    d.coordinator.superlink.kill()  # SIGKILL SuperLink, SuperExec and ServerApp
    killed_at = time.monotonic()
    assert d.coordinator.superlink.pid() is None
    d.start_coordinator()  # same state database: registrations survive; merchants reconnect
    d.wait_online(3, timeout=120)
    resumed = d.coordinator.launch(run_config(tiny_bert), resume="resume")
    assert d.coordinator.wait(resumed, RUN_TIMEOUT) == "finished:completed"

    rows = rows_of(launch.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]  # round 1 was not run again
    for row in rows[1:]:
        assert row["merchants"]["shop-a"]["status"] == "refused-budget"
        # the coordinator is told why, in a fixed public word: no σ fits the budget left, or no charge
        assert row["merchants"]["shop-a"]["reason"] in ("calibration", "budget")
        assert row["merchants"]["shop-b"]["status"] == "trained"
    assert (launch.run_dir / "final").is_dir()
    assert len(d.coordinator.run_ids("resume")) == 2
    assert time.monotonic() - killed_at < RUN_TIMEOUT
    for name in SHOPS:
        eps = epsilons(d.ledger(name))
        assert all(b >= a for a, b in itertools.pairwise(eps))
    assert d.ledger("shop-a")["epsilon"] <= spent + 1e-3
