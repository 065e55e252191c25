"""Ingest of merchants' behaviour exports into a validated, sessionised local Parquet store.

    from client.ingest import ingest
    report = ingest(Path("UserBehavior.csv"), "taobao", Path("merchant-1"))

Formats (`client.ingest.formats`): `taobao`, `retailrocket` (optional item categories), `yoochoose`
(clicks + buys), and any shop's `csv` / `parquet` / `jsonl` export (`generic` picks by extension) with
`mapping` (store field -> source column) and `behavior_map` (shop name -> view|fav|cart|buy|search|
review; the usual aliases pv, addtocart, transaction, purchase... are always known).

Output in `out_dir` (`client.ingest.store`): `store/part-NNNNN.parquet` (`STORE_SCHEMA`; every
customer's events are in one part), `quarantine.parquet` (`QUARANTINE_SCHEMA`) and
`ingest-report.json`. good + quarantined = total, always; a failed ingest leaves the old output.

source_row: the 1-based row number in its source file. For text files every line is a row and the
header is not counted, so it is the line number of a headerless file (Taobao, YooChoose, JSON Lines)
and the line number minus one of a file with a header (RetailRocket, generic CSV). For Parquet it is
the row's position. Blank lines are rows too (quarantined as `empty_row`). YooChoose has two files: the
quarantine names the file; in the store, behaviour `view` rows come from the clicks and `buy` rows from
the buys.

Sessions (`client.ingest.sessions`): the source's session id when the format has one (YooChoose, or a
mapped `session_id`), else a new session after `session_gap_s` of inactivity per customer, id
`<customer_id>:<first event, Unix ms>`. Sources need not be sorted: the first pass spills good rows to
Arrow files partitioned by a customer hash, the second sorts one partition at a time, so memory is
bounded by the batch and partition sizes (about `2 * batch_rows` rows), never by the file.
"""

from client.ingest.formats import FORMATS
from client.ingest.run import IngestReport, ingest
from client.ingest.schema import QUARANTINE_SCHEMA, STORE_SCHEMA, IngestError, Reason

__all__ = ["FORMATS", "QUARANTINE_SCHEMA", "STORE_SCHEMA", "IngestError", "IngestReport", "Reason", "ingest"]
