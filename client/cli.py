"""`fedbehavior merchant init|start|stop`: the merchant's daemon (a Flower SuperNode)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def cmd_init(args: argparse.Namespace) -> int:
    from client.daemon import init_merchant

    settings = init_merchant(
        Path(args.merchant_dir),
        merchant_id=args.merchant_id,
        superlink=args.superlink,
        root_certificates=Path(args.root_certificates) if args.root_certificates else None,
        max_epsilon=args.max_epsilon,
        delta=args.delta,
        insecure=args.insecure,
        runtime_port=args.runtime_port,
    )
    folder = Path(args.merchant_dir).resolve()
    print(f"merchant {settings.merchant_id} set up in {folder}: settings in {folder / 'merchant.toml'}")
    if settings.daemon.private_key is not None and not settings.daemon.insecure:
        print(f"  private key (never share it, mode 0600): {settings.daemon.private_key}")
        print(f"  send this public key to the coordinator:   {settings.daemon.private_key}.pub")
    print(f"  put events.jsonl (or an ingested store/) in {settings.data_dir}")
    print(f"  once the coordinator has registered your key: fedbehavior merchant start {folder}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from client.daemon import INSECURE_WARNING, Merchant

    merchant = Merchant.open(Path(args.merchant_dir))
    if merchant.settings.daemon.insecure and not args.insecure:
        raise RuntimeError(
            f"{merchant.folder / 'merchant.toml'} says insecure = true: confirm with "
            f"`fedbehavior merchant start {merchant.folder} --insecure` (development only), or set it to "
            "false and give root-certificates and private-key"
        )
    if args.foreground:
        if merchant.settings.daemon.insecure:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)
        cmd = merchant.supernode_command()
        os.execve(cmd[0], cmd, {**os.environ, **merchant.env()})
    pid = merchant.start()
    print(
        f"merchant {merchant.settings.merchant_id}: SuperNode running (pid {pid}), dialling "
        f"{merchant.settings.daemon.superlink}; log: {merchant.supernode.log_file}"
    )
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from client.daemon import Merchant

    merchant = Merchant.open(Path(args.merchant_dir))
    print("SuperNode stopped" if merchant.stop() else "SuperNode was not running")
    return 0


def add_merchant_daemon_cli(merchant: Any) -> None:
    init = merchant.add_parser("init", help="create merchant.toml and an authentication key pair")
    init.add_argument("merchant_dir")
    init.add_argument("--merchant-id", required=True)
    init.add_argument("--superlink", required=True, help="coordinator address host:port")
    init.add_argument("--root-certificates", default="", help="the coordinator's CA certificate (ca.crt)")
    init.add_argument("--max-epsilon", type=float, default=8.0, help="your privacy budget (default 8)")
    init.add_argument("--delta", type=float, default=1e-6)
    init.add_argument(
        "--runtime-port", type=int, default=9094, help="local port, unique per merchant on a host"
    )
    init.add_argument("--insecure", action="store_true", help="no TLS, no key: development only")
    init.set_defaults(func=cmd_init)

    start = merchant.add_parser("start", help="start this merchant's daemon (Flower SuperNode)")
    start.add_argument("merchant_dir")
    start.add_argument("--foreground", action="store_true", help="run in this process (systemd, containers)")
    start.add_argument(
        "--insecure", action="store_true", help="confirm plaintext operation (development only)"
    )
    start.set_defaults(func=cmd_start)

    stop = merchant.add_parser("stop", help="stop this merchant's daemon")
    stop.add_argument("merchant_dir")
    stop.set_defaults(func=cmd_stop)
