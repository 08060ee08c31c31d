"""The datasets an SDG run publishes, as JSONL and Parquet:

    sft.jsonl / sft.parquet                one row per kept response
        text        the conversation, rendered with the factory's chat format (a data source's text_field)
        messages    [{"role", "content"}, ...] ending with the assistant's response
        prompt, response, kind, prompt_id, id
        scores      {attribute: value} from the reward model (null without one)
        score       the weighted score, verified / verified_by (null where nothing checks)
    preference.jsonl / preference.parquet  one row per ranked pair (NeMo-Aligner's DPO fields)
        prompt, chosen_response, rejected_response, chosen_reward, rejected_reward,
        chosen_scores, rejected_scores, ranked_by, kind, prompt_messages, text (prompt + chosen)
    stats.json                             counts per step: generated, reused, dropped and why

Both are a factory data source as they are: ``data: {source: <uri>/sft.parquet}`` (or
``sft.jsonl``), ``text_field: text``, for pretraining or distillation.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.digests import file_digest
from model.fsutil import atomic_write_text

FORMATS = ("jsonl", "parquet")
# Columns whose contents vary in shape from row to row: JSON strings in Parquet.
_JSON_COLUMNS = ("meta",)


def render_conversation(messages: list[dict], eos_token: str = "<eos>") -> str:
    """The text ``model/tokenizer.py: CHAT_TEMPLATE`` renders (without a generation prompt),
    written without a tokenizer; ``eos_token`` is the factory tokenizer's (``model.tokenizer.EOS``)."""
    return "".join(f"<|{m['role']}|>\n{m['content']}{eos_token if m['role'] == 'assistant' else ''}\n"
                   for m in messages)


def write_jsonl(rows: list[dict], path: Path) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [{k: (json.dumps(v, ensure_ascii=False) if k in _JSON_COLUMNS else v) for k, v in row.items()}
            for row in rows]
    table = pa.Table.from_pylist(flat) if flat else pa.table({"text": pa.array([], pa.string())})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def write_datasets(out: Path, sft: list[dict], preference: list[dict], stats: dict,
                   formats: tuple[str, ...] = FORMATS) -> dict[str, dict]:
    """Write both datasets (rows sorted by id: the same records give the same files) and
    stats.json into ``out``; returns {file name: {"rows", "sha256", "columns"}}."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in (("sft", sft), ("preference", preference)):
        rows = sorted(rows, key=lambda r: r["id"])
        for fmt, write in (("jsonl", write_jsonl), ("parquet", write_parquet)):
            if fmt in formats:
                path = out / f"{name}.{fmt}"
                write(rows, path)
                files[path.name] = {"rows": len(rows), "sha256": file_digest(path),
                                    "columns": list(rows[0]) if rows else []}
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=1, sort_keys=True))
    return files
