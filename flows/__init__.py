"""Prefect flows and the `factory` command line."""
