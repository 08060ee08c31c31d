"""Evaluation of any checkpoint: quality, lm-eval benchmarks, recall, efficiency, reports, gate.

    spec.py        the recipe's ``evaluate`` section (and the MQAR training recipe)
    quality.py     validation loss / perplexity, KL to the teacher, greedy agreement
    harness.py     lm-evaluation-harness through its ``hf`` model; generated local tasks
    recall.py      MQAR and passkey: generators, scorers, evaluation, MQAR training
    report.py      metrics.json, report.md, PNG charts
    gate.py        headline metrics, ratios to the teacher, the promotion gate
    evaluate.py    evaluate_checkpoint, evaluate_folders: checkpoint folders in, results and a report out
    evaluate_stage.py  the evaluate stage (the stage contract, docs/stage-contract.md)

Prefill / decode speed, cache bytes and peak memory are measured by ``model/efficiency.py``,
which the architecture search uses too.

Modules are imported where used: loading a recipe imports only ``spec``.
"""
