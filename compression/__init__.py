"""Compression (Minitron-SSM / MiniPuzzle): importance, pruning, search, distillation. No Prefect, no MLflow."""
