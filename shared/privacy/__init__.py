"""Differential-privacy accounting: the merchant's ledger and noise calibration (no Flower, no torch)."""

from shared.privacy.accounting import Charge, epsilon_of
from shared.privacy.ledger import BudgetExceededError, Ledger

__all__ = ["BudgetExceededError", "Charge", "Ledger", "epsilon_of"]
