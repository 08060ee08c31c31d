"""Compression (Minitron-SSM / MiniPuzzle): importance, pruning, search, distillation, each with
its stage (``*_stage.py``). No Prefect, no MLflow."""
