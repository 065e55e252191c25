"""Differential-privacy accounting: the merchant's ledger and noise calibration (no Flower, no torch)."""

from shared.privacy.accounting import ACCOUNTANTS, DEFAULT_ACCOUNTANT, Accountant, Charge, epsilon_of
from shared.privacy.ledger import BudgetExceededError, Ledger
from shared.privacy.units import PRIVACY_UNITS, PrivacyUnit

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "PRIVACY_UNITS",
    "Accountant",
    "BudgetExceededError",
    "Charge",
    "Ledger",
    "PrivacyUnit",
    "epsilon_of",
]
