"""Synthetic data generation (Nemotron-4 340B style) and its stage (``sdg_stage.py``). No Prefect."""
