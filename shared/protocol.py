"""Names of the records exchanged between coordinator and merchants (shared by both Flower apps).

Server → merchant: `arrays` (global adapter), `config` (the run's RunConfig, kebab-case), `round`
(`server-round`, `run-key`). Merchant → server: `arrays` (trained adapter, only when trained),
`metrics` (scalars only), `status` (`status`, `merchant-id`, `reason`), and with a trained update
`privacy` (`accountant`, `privacy-unit`: the public parameters of the merchant's ledger).
"""

from shared.privacy import ACCOUNTANTS, PRIVACY_UNITS

ARRAYS = "arrays"
CONFIG = "config"
ROUND = "round"
METRICS = "metrics"
STATUS = "status"
PRIVACY = "privacy"
PRIVACY_VALUES = {"accountant": frozenset(ACCOUNTANTS), "privacy-unit": frozenset(PRIVACY_UNITS)}
"""The `privacy` record's keys and the only words each may hold (the ledger's own vocabulary)."""

SERVER_ROUND = "server-round"
RUN_KEY = "run-key"
EVALUATED = "evaluated"
