"""Keys and certificates: merchant authentication keys, and a DEVELOPMENT-ONLY certificate authority.

Merchant keys are what Flower's SuperNode authentication uses: an EC P-384 key pair in OpenSSH format.
The private key stays with the merchant; the public key is registered at the coordinator.

A merchant's app-approval key (Ed25519, OpenSSH format) signs the apps the merchant approved; its
public half is the only "trusted entity" the merchant's SuperNode accepts (see `client/daemon/trust.py`).

`make_dev_ca` / `make_server_cert` create a throw-away CA and a TLS certificate for the SuperLink so
that a deployment can be tried on one machine or a lab network. A production coordinator uses a
certificate from its organisation's CA instead (any PEM certificate + key works).

Every private key is written with owner-only permissions (0600) from the moment the file exists, and
no function here logs or prints key material.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SECRET_MODE = 0o600


def write_secret(path: Path, payload: bytes) -> None:
    """Create `path` with mode 0600 (never readable by others, not even briefly) and write `payload`.

    Refuses to overwrite an existing file: replacing a key by accident locks a merchant out.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; refusing to overwrite a private key") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(payload)
    os.chmod(path, SECRET_MODE)  # in case the umask or the file system widened it


def check_secret_permissions(path: Path) -> None:
    """Raise if a private key file can be read or written by anyone but its owner."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(
            f"{path} has permissions {mode:o}; a private key must be readable by its owner only. "
            f"Fix: chmod 600 {path}"
        )


@dataclass(frozen=True)
class KeyPair:
    private_key: Path
    public_key: Path


def make_merchant_keys(folder: Path, name: str = "supernode") -> KeyPair:
    """An EC P-384 key pair in OpenSSH format: `<name>` (private, 0600) and `<name>.pub`."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = folder / name
    public = folder / f"{name}.pub"
    write_secret(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + b"\n"
    )
    return KeyPair(private, public)


def make_approval_key(folder: Path, name: str = "approval-key") -> KeyPair:
    """An Ed25519 key pair in OpenSSH format: `<name>` (private, 0600) and `<name>.pub`."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = folder / name
    public = folder / f"{name}.pub"
    write_secret(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + b"\n"
    )
    return KeyPair(private, public)


def load_approval_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The Ed25519 private key at `path`, after checking that only its owner can read it."""
    check_secret_permissions(path)
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 key; remove it and let `merchant trust` make a new one")
    return key


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbehavior development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class DevCertificates:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def make_dev_certificates(folder: Path, hosts: list[str], days: int = 365) -> DevCertificates:
    """DEVELOPMENT ONLY: a fresh CA and a SuperLink certificate for `hosts` (names or IP addresses).

    Writes ca.crt, ca.key (0600), server.pem, server.key (0600) in `folder`. Merchants need ca.crt
    only. The CA key can sign anything for anyone who holds it: keep it off shared machines.
    """
    if not hosts:
        raise ValueError("give at least one host name or IP address the merchants will connect to")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedbehavior development CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    out = DevCertificates(folder / "ca.crt", folder / "ca.key", folder / "server.pem", folder / "server.key")
    folder.mkdir(parents=True, exist_ok=True)
    write_secret(out.ca_key, _pem_key(ca_key))
    write_secret(out.server_key, _pem_key(server_key))
    out.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return out
