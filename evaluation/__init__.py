"""Evaluation of any checkpoint: quality, lm-eval benchmarks, recall, efficiency, reports, gate.

    spec.py        the recipe's ``evaluate`` section (and the MQAR training recipe)
    quality.py     validation loss / perplexity, KL to the teacher, greedy agreement
    harness.py     lm-evaluation-harness through its ``hf`` model; generated local tasks
    recall.py      MQAR and passkey: generators, scorers, evaluation, MQAR training
    efficiency.py  prefill / decode tokens/s, cache bytes (measured and analytic), peak memory
    report.py      metrics.json, report.md, PNG charts
    gate.py        headline metrics, ratios to the teacher, the promotion gate
    stage.py       evaluate_checkpoint, evaluate_folders, run_evaluate (the stage contract)

Modules are imported where used: loading a recipe imports only ``spec``.
"""
