"""`fedbehavior merchant ingest`: the command behind `client.cli`'s flags (labels copied beside the store)."""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.cli import parse_pairs


def copy_labels(source: Path, out_dir: Path) -> Path:
    """Check a labels file's header and copy it into the merchant folder, as `labels.csv[.gz|…]`."""
    import shutil

    from client.ingest.labels import LABELS_FILES, check_header

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
