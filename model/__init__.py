"""Architectures, tokenizer, data, training loop, evaluation. No Prefect, no MLflow."""
