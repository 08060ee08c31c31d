"""Architectures, tokenizer, data, training loop, checkpoints, cost and efficiency measurement,
the device policy and the stage contract; the data and pretrain stages. No Prefect, no MLflow."""
