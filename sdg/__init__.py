"""Synthetic data generation (Nemotron-4 340B style). No Prefect."""
