"""Deployment pieces without a network: keys and certificates, settings files, daemons, commands, audit."""

from __future__ import annotations

import ssl
import stat
import sys
import time
from pathlib import Path

import psutil
import pytest
import tomllib
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.daemon.control import Merchant, init_merchant
from client.daemon.trust import AppBundle
from client.settings import MerchantSettings
from server.audit import audit_problems
from server.deploy import CoordinatorHome
from shared.cli import main
from shared.daemon import Daemon
from shared.pki import check_secret_permissions, make_dev_certificates, make_merchant_keys, write_secret
from shared.settings import SettingsError
from tests.deploy_helpers import write_rogue_app

# ------------------------------------------------------------------------------------- keys, certs


def test_merchant_keys_are_p384_openssh_and_owner_only(tmp_path: Path) -> None:
    pair = make_merchant_keys(tmp_path / "keys")
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
    private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(pair.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()  # a matching pair
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_merchant_keys(tmp_path / "keys")


def test_secret_permissions_checked(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_secret(path, b"x")
    check_secret_permissions(path)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        check_secret_permissions(path)


def test_dev_certificate_chain_verifies_for_its_hosts_only(tmp_path: Path) -> None:
    certs = make_dev_certificates(tmp_path, ["coord.example.com", "127.0.0.1"])
    for key in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example.com"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # Python's TLS stack accepts the pair as a server identity, trusting only the CA
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    assert client_ctx.check_hostname
    with pytest.raises(ValueError, match="at least one host"):
        make_dev_certificates(tmp_path / "x", [])


# ------------------------------------------------------------------------------------- settings


def test_merchant_toml_precedence_flags_env_file_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "merchant.toml").write_text(
        'merchant-id = "shop"\nmax-epsilon = 3.0\ndelta = 1e-7\n[daemon]\nsuperlink = "h:1"\n'
        'private-key = "k/key"\n'
    )
    s = MerchantSettings.from_merchant_dir(tmp_path)
    assert (s.max_epsilon, s.delta, s.eval_fraction) == (3.0, 1e-7, 0.2)  # file, file, default
    assert s.daemon.superlink == "h:1"
    assert s.daemon.private_key == tmp_path / "k" / "key"  # relative to the file's folder
    assert s.data_dir == tmp_path and s.state_dir == tmp_path / "state"
    monkeypatch.setenv("FEDBEHAVIOR_MERCHANT_MAX_EPSILON", "2.5")
    monkeypatch.setenv("FEDBEHAVIOR_MERCHANT_DAEMON__SUPERLINK", "other:2")
    s = MerchantSettings.from_merchant_dir(tmp_path)
    assert s.max_epsilon == 2.5 and s.daemon.superlink == "other:2"  # environment beats the file
    assert MerchantSettings.from_merchant_dir(tmp_path, max_epsilon=1.0).max_epsilon == 1.0  # flags win


def test_settings_errors_name_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "merchant.toml"
    path.write_text('merchant-id = "shop"\nmax-epsilom = 3.0\n')
    with pytest.raises(SettingsError, match=r"unknown key 'max-epsilom'.*") as err:
        MerchantSettings.from_merchant_dir(tmp_path)
    assert str(path) in str(err.value)
    path.write_text('merchant-id = "shop"\nmax-epsilon = -1\n')
    with pytest.raises(SettingsError, match="'max-epsilon': Input should be greater than 0"):
        MerchantSettings.from_merchant_dir(tmp_path)
    path.write_text("merchant-id = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        MerchantSettings.from_merchant_dir(tmp_path)


def test_coordinator_settings_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "coordinator.toml").write_text("port = 9100\nsupernode-auth = false\ninsecure = true\n")
    home = CoordinatorHome.open(tmp_path)
    assert home.settings.port == 9100 and not home.settings.supernode_auth
    assert home.settings.ssl_certfile == tmp_path / "certs" / "server.pem"
    assert home.app == Path(__file__).resolve().parent.parent  # default: this project's own app
    (tmp_path / "coordinator.toml").write_text("port = 9100\nsupernode-auth = false\n")
    with pytest.raises(SettingsError, match="only with insecure = true"):
        CoordinatorHome.open(tmp_path)  # merchant authentication off is for development only
    (tmp_path / "coordinator.toml").write_text('port = 9100\napp = "frozen/app"\n')
    assert CoordinatorHome.open(tmp_path).app == tmp_path / "frozen" / "app"
    monkeypatch.setenv("FEDBEHAVIOR_COORDINATOR_PORT", "9200")
    assert CoordinatorHome.open(tmp_path).settings.dial_address == "127.0.0.1:9200"


# ------------------------------------------------------------------------------------- commands


def test_superlink_command_tls_auth_and_insecure(tmp_path: Path) -> None:
    home = CoordinatorHome.open(tmp_path)
    with pytest.raises(FileNotFoundError, match="coordinator dev-certs"):
        home.superlink_command()  # no certificate yet: the error says how to make one
    make_dev_certificates(tmp_path / "certs", ["localhost"])
    cmd = home.superlink_command()
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(tmp_path / "certs" / "server.pem")
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "state.db")
    insecure = CoordinatorHome.open(tmp_path, insecure=True).superlink_command()
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    config = tomllib.loads(home.write_flwr_config().read_text())
    assert config["superlink"]["default"] == "fedbehavior"
    assert config["superlink"]["fedbehavior"]["root-certificates"] == str(tmp_path / "certs" / "ca.crt")


def test_merchant_init_and_supernode_command(tmp_path: Path) -> None:
    certs = make_dev_certificates(tmp_path / "certs", ["localhost"])
    with pytest.raises(ValueError, match="--root-certificates"):
        init_merchant(tmp_path / "m", merchant_id="m", superlink="h:1", root_certificates=None)
    s = init_merchant(
        tmp_path / "m", merchant_id="shop", superlink="h:1", root_certificates=certs.ca_cert, max_epsilon=4
    )
    assert s.max_epsilon == 4.0 and s.daemon.private_key == tmp_path / "m" / "keys" / "supernode"
    Merchant.open(tmp_path / "m").trust.approve(AppBundle.load(write_rogue_app(tmp_path / "app")))
    cmd = Merchant.open(tmp_path / "m").supernode_command()
    assert cmd[cmd.index("--root-certificates") + 1] == str(certs.ca_cert)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(s.daemon.private_key)
    assert cmd[cmd.index("--node-config") + 1] == f'merchant-dir="{tmp_path / "m"}"'
    assert "--insecure" not in cmd
    with pytest.raises(FileExistsError):
        init_merchant(tmp_path / "m", merchant_id="shop", superlink="h:1", root_certificates=certs.ca_cert)
    s.daemon.private_key.chmod(0o640)  # type: ignore[union-attr]
    with pytest.raises(PermissionError):
        Merchant.open(tmp_path / "m").supernode_command()


def test_insecure_is_explicit_and_loud(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["merchant", "init", str(tmp_path / "m"), "--merchant-id", "m", "--superlink", "h:1"]) == 2
    assert "--insecure" in capsys.readouterr().err  # no CA and no --insecure: refused, with the fix
    assert (
        main(
            [
                "merchant",
                "init",
                str(tmp_path / "m"),
                "--merchant-id",
                "m",
                "--superlink",
                "h:1",
                "--insecure",
            ]
        )
        == 0
    )
    merchant = Merchant.open(tmp_path / "m")
    merchant.trust.approve(AppBundle.load(write_rogue_app(tmp_path / "app")))
    assert "--insecure" in merchant.supernode_command() and not (tmp_path / "m" / "keys").exists()
    assert main(["merchant", "start", str(tmp_path / "m")]) == 2  # starting insecure needs the flag again
    assert "--insecure" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "coordinator.toml").write_text("insecure = true\n")
    assert main(["coordinator", "--home", str(tmp_path / "c"), "start"]) == 2
    assert "explicit flag" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- daemons


def test_daemon_stops_the_whole_process_tree(tmp_path: Path) -> None:
    daemon = Daemon("sleeper", tmp_path)
    code = (
        "import subprocess, sys, time;"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True);"
        "print('ready', flush=True); time.sleep(60)"
    )
    pid = daemon.start([sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while "ready" not in daemon.log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    tree = [p.pid for p in psutil.Process(pid).children(recursive=True)]
    assert daemon.pid() == pid and len(tree) == 1  # the grandchild lives in a session of its own
    with pytest.raises(RuntimeError, match="already running"):
        daemon.start([sys.executable, "-c", "pass"])
    assert daemon.stop(timeout=5)
    assert daemon.pid() is None and not daemon.pid_file.exists()
    assert not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in [pid, *tree]
    )
    assert not daemon.stop()


# ------------------------------------------------------------------------------------- audit


def _entry(**records: dict) -> dict:
    return {"round": 1, "node_id": 7, "records": records}


def test_audit_flags_anything_but_expected_tensors_and_scalars() -> None:
    expected = {"lora_A": (2, 4), "head": (3,)}
    good = _entry(
        arrays={
            "type": "arrays",
            "tensors": {
                "lora_A": {"shape": [2, 4], "dtype": "float32", "bytes": 160, "value_bytes": 32},
                "head": {"shape": [3], "dtype": "float32", "bytes": 140, "value_bytes": 12},
            },
        },
        metrics={"type": "metrics", "values": {"epsilon": 1.5, "examples": 40}},
        status={"type": "config", "values": {"status": "trained", "merchant-id": "a", "reason": ""}},
    )
    assert audit_problems([good], expected) == []
    bad = [
        _entry(text={"type": "config", "values": {"title": "iPhone 12"}}),
        _entry(
            arrays={
                "type": "arrays",
                "tensors": {
                    "lora_A": {"shape": [2, 4], "dtype": "float32", "bytes": 1160, "value_bytes": 32}
                },
            }
        ),
        _entry(
            arrays={
                "type": "arrays",
                "tensors": {
                    "lora_A": {"shape": [4, 2], "dtype": "float32", "bytes": 160, "value_bytes": 32},
                    "head": {"shape": [3], "dtype": "int64", "bytes": 152, "value_bytes": 24},
                },
            }
        ),
        _entry(metrics={"type": "metrics", "values": {"rows": [1.0, 2.0]}}),
        _entry(status={"type": "config", "values": {"status": "trained", "query": "red shoes"}}),
    ]
    problems = [audit_problems([b], expected) for b in bad]
    assert "unexpected record 'text'" in problems[0][0]
    assert any("missing ['head']" in p for p in problems[1]) and any(
        "sends 1160 bytes" in p for p in problems[1]
    )
    assert any("shape (4, 2)" in p for p in problems[2]) and any("not a float" in p for p in problems[2])
    assert "not a scalar" in problems[3][0]
    assert "query" in problems[4][0]
