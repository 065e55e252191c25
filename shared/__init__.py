"""fedbehavior shared package: data model, text, tasks, model, adapters and privacy ledger.

Nothing in this package imports Flower; the training core runs without it.
"""

__version__ = "0.1.0"
