"""Prefect flows: the training pipeline (and, as they land, monitoring)."""
