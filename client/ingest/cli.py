"""`fedbehavior merchant ingest`: the argparse wiring of `client.ingest.ingest`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from client.ingest.formats import FORMATS
from client.ingest.schema import IngestError

_PAIR = re.compile(r"\s*(?P<key>[^=:→]+?)\s*(?:=|->|→|:)\s*(?P<value>.+?)\s*$")

EPILOG = """examples:
  fedbehavior merchant ingest UserBehavior.csv --format taobao --out merchant-1
  fedbehavior merchant ingest events.csv --format retailrocket --categories item_properties_part1.csv --out m2
  fedbehavior merchant ingest yoochoose-data/ --format yoochoose --out m3
  fedbehavior merchant ingest export.csv --format csv --out m4 \\
      --map customer_id=user,timestamp=event_time,behavior=event,item_id=sku \\
      --behavior-map product_view=view,add_to_cart=cart,purchase=buy
  fedbehavior merchant ingest export.csv.gz --format csv --out m5 \\
      --map customer_id=user_id,session_id=session_id,timestamp=timestamp,behavior=event \\
      --behavior-map product_view=view,add_to_cart=cart,shipping_details=cart,purchase=buy \\
      --attribute platform,user_lifecycle

Event names that --behavior-map does not map are kept with role `other` (their own name goes into the
text) and counted in the report; --strict quarantines them instead. CSV and JSON Lines may be .gz,
.bz2 or .zst.
"""


def parse_pairs(items: list[str] | str, what: str) -> dict[str, str]:
    """`a=b,c=d` (also `a->b`, `a→b`, `a:b`; repeated options add up) as a dict."""
    texts = [items] if isinstance(items, str) else items
    out: dict[str, str] = {}
    for text in texts:
        for item in filter(str.strip, text.split(",")):
            match = _PAIR.match(item)
            if match is None:
                raise IngestError(f"{what}: {item.strip()!r} is not NAME=VALUE (e.g. product_view=view)")
            out[match["key"]] = match["value"]
    return out


def add_ingest_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `ingest` on an argparse subparsers object (e.g. the `merchant` command's)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "ingest",
        help="ingest a shop export into a validated local Parquet store",
        description="Read a behaviour export (Taobao, RetailRocket, YooChoose or any CSV/Parquet/JSONL), "
        "validate it, quarantine bad rows with their row number and reason, cut sessions, and write "
        "<out>/store/part-*.parquet, <out>/quarantine.parquet and <out>/ingest-report.json. "
        "The source file is only read.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", type=Path, help="the export file (YooChoose: the clicks file or its folder)"
    )
    parser.add_argument("--format", "-f", dest="fmt", required=True, choices=FORMATS, help="source format")
    parser.add_argument("--out", "-o", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="csv/parquet/jsonl: store field <- source column, comma-separated or repeated "
        "(fields: customer_id, session_id, timestamp, behavior, item_id, category, price, query, title)",
    )
    parser.add_argument(
        "--behavior-map",
        action="append",
        default=[],
        metavar="NAME=BEHAVIOR",
        help="the shop's behaviour names, e.g. product_view=view,add_to_cart=cart,purchase=buy",
    )
    parser.add_argument(
        "--attribute",
        action="append",
        default=[],
        metavar="COLUMN[,COLUMN]",
        help="csv/parquet/jsonl: customer or session attribute columns kept for the text (platform, ...)",
    )
    parser.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quarantine event names --behavior-map does not map (default: on for taobao, retailrocket, "
        "yoochoose; off for csv/parquet/jsonl, where they get role `other`)",
    )
    parser.add_argument("--categories", help="retailrocket: itemid,categoryid CSV or item_properties files")
    parser.add_argument(
        "--labels",
        type=Path,
        metavar="FILE",
        help="the merchant's own labels for task customer-label (CSV: customer_id,label or "
        "customer_id,session_id,label), copied beside the store; rows are checked when training",
    )
    parser.add_argument("--session-gap", type=int, default=1800, metavar="SECONDS", help="inactivity gap")
    parser.add_argument("--batch-rows", type=int, default=1_000_000, help="rows per batch (memory bound)")
    parser.add_argument(
        "--replace-smaller",
        action="store_true",
        help="replace an existing store even when the new export has fewer good rows (default: refuse)",
    )
    parser.set_defaults(func=cmd_ingest)
    return parser


def copy_labels(source: Path, out_dir: Path) -> Path:
    """Check a labels file's header and copy it into the merchant folder, as `labels.csv[.gz|…]`."""
    import shutil

    from client.labels import LABELS_FILES, check_header

    check_header(source)
    suffix = "".join(s for s in source.suffixes[-1:] if s in (".gz", ".bz2", ".zst"))
    for old in LABELS_FILES:  # one labels file per folder: the new one replaces any older one
        (out_dir / old).unlink(missing_ok=True)
    target = out_dir / f"labels.csv{suffix}"
    shutil.copyfile(source, target)
    return target


def cmd_ingest(args: argparse.Namespace) -> int:
    """Run an ingest from parsed arguments and print its summary."""
    from client.ingest.run import ingest

    mapping = parse_pairs(args.map, "--map") or None
    if args.categories:
        mapping = {**(mapping or {}), "categories": args.categories}
    report = ingest(
        args.source,
        args.fmt,
        args.out,
        mapping=mapping,
        behavior_map=parse_pairs(args.behavior_map, "--behavior-map") or None,
        session_gap_s=args.session_gap,
        batch_rows=args.batch_rows,
        attributes=tuple(c.strip() for text in args.attribute for c in text.split(",") if c.strip()),
        strict=args.strict,
        replace_smaller=args.replace_smaller,
    )
    if args.labels is not None:
        print(f"labels: {copy_labels(args.labels, args.out)}")
    print(f"{report.total} rows: {report.good} good, {report.quarantined} quarantined")
    for reason, count in report.reasons.items():
        example = report.examples[reason][0]
        print(f"  {count:>9}  {reason:<24} e.g. row {example['source_row']}: {example['detail']}")
    if report.unmapped_events:
        shown = ", ".join(f"{name} ({count})" for name, count in list(report.unmapped_events.items())[:12])
        more = len(report.unmapped_events) - 12
        print(
            f"  event names with role `other` (map them with --behavior-map): {shown}"
            + (f" and {more} more" if more > 0 else "")
        )
    print("  roles: " + ", ".join(f"{role} {count}" for role, count in sorted(report.roles.items())))
    sessions = f"{report.sessions} sessions ({report.session_mode})"
    print(f"{report.customers} customers, {sessions}, {report.seconds:.1f} s")
    print(f"store: {report.store_dir}  quarantine: {report.quarantine_path}")
    return 0
