"""Prefect: the one generic task every stage runs as, its cache and retry policies, and what the
Prefect UI shows."""
