"""`fedbehavior merchant preview`: the exact texts and labels the model will see, for a privacy officer.

It runs the same path as training (load and validate events, build the task's examples, split
customers, serialise with the backbone's tokenizer and token budget) and prints a few examples. It
reads only: quarantine counts are reported, but no file of the merchant is written.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from shared.config import MerchantPlan, parse_sets


def _data_folder(folder: Path) -> tuple[Path, str]:
    """The data folder and merchant id of a merchant folder (merchant.toml) or of a data folder."""
    if (folder / "merchant.toml").is_file():
        from client.settings import MerchantSettings

        settings = MerchantSettings.from_merchant_dir(folder)
        return settings.data_dir, settings.merchant_id
    return folder, folder.resolve().name


def preview(folder: Path, cfg: MerchantPlan, *, limit: int = 5, eval_fraction: float = 0.2) -> dict[str, Any]:
    """Examples as the model sees them: text, label, customer, session, split, token count."""
    from client.ingest.data import Encoder, load_merchant_data
    from shared.model import load_tokenizer

    data_dir, merchant_id = _data_folder(folder)
    task = cfg.task_spec
    with tempfile.TemporaryDirectory() as scratch:  # quarantine files go here, not to the merchant
        data = load_merchant_data(
            data_dir,
            Path(scratch),
            task,
            eval_fraction=eval_fraction,
            salt=merchant_id,
            split=cfg.eval_split,
            cutoff=cfg.eval_cutoff_time,
            require_both=False,  # a preview of a small sample may have no held-out customer yet
        )
    report = data.load_report
    tokenizer = load_tokenizer(cfg.backbone)
    encoder = Encoder(tokenizer, cfg.max_length)
    shown = []
    for split, candidates in (("train", data.train_round("preview")), ("held-out", data.evaluation())):
        for c in candidates[:limit]:
            text = encoder.text(c)
            tokens = len(tokenizer(text, truncation=True, max_length=cfg.max_length)["input_ids"])
            shown.append(
                {
                    "split": split,
                    "customer_id": c.customer_id,
                    "session_id": c.session_id,
                    "label": task.labels[c.label],
                    "tokens": tokens,
                    "text": text,
                }
            )
    return {
        "task": task.name,
        "labels": list(task.labels),
        "events": report.good,
        "quarantined": report.quarantined,
        "sessions": data.stats.sessions,
        "examples": data.stats.candidates,
        "skipped": data.stats.skipped,
        "train_customers": len(data.train_customers),
        "held_out_customers": len(data.eval_customers),
        "shown": shown,
    }


def cmd_preview(args: argparse.Namespace) -> int:
    cfg = MerchantPlan.parse({"task": args.task, **parse_sets(args.set)})
    result = preview(Path(args.folder), cfg, limit=args.limit)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    print(
        f"{result['task']} ({', '.join(result['labels'])}): {result['events']} events "
        f"({result['quarantined']} quarantined), {result['examples']} examples from {result['sessions']} "
        f"sessions/customers, skipped {result['skipped'] or 'none'}; {result['train_customers']} training / "
        f"{result['held_out_customers']} held-out customers"
    )
    for row in result["shown"]:
        print(
            f"\n[{row['split']}] customer {row['customer_id']} session {row['session_id']}: "
            f"label {row['label']} ({row['tokens']} tokens)"
        )
        print(f"  {row['text']}")
    return 0
