"""The package version, in one place (read by the ledger manifest and evaluation results)."""

__version__ = "0.1.0"
