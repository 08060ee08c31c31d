"""Scorers: a multi-attribute reward model, and an LLM judge with position swapping.

**Reward-model checkpoints.** Two layouts load:

1. The factory's: any causal-LM checkpoint folder (``AutoModelForCausalLM``: Nemotron-H,
   Hymba, Llama, ...) plus a linear head on the last token's final hidden state,
   as in Nemotron-4-340B-Reward (a linear head on the end-of-response token):

       reward_head.safetensors   weight (A, hidden_size) float32, bias (A,)
       reward_head.json          {"format": "factory-reward-head", "attributes": ["helpfulness", ...]}

   ``save_reward_head`` writes one (``init_reward_head`` a seeded random one;
   ``alignment/reward.py`` trains one on a frozen backbone, pooling through
   ``last_token_states`` as scoring does).
2. An HF ``AutoModelForSequenceClassification`` checkpoint with ``num_labels`` = number
   of attributes and ``id2label`` naming them (e.g. a Llama-based regression RM).

Scores are kept per attribute; ``combine`` weighs them into one number (default weights:
Nemotron-4-340B-Reward's 0.3 helpfulness + 0.74 correctness + 0.46 coherence + 0.47
complexity - 0.33 verbosity), so weights and thresholds can change without re-scoring.

**Judge.** The judge sees the prompt and two responses and answers ``[[A]]`` or ``[[B]]``.
Each pair is asked in both orders; it is kept only when both verdicts pick the same
response (Nemotron-4 340B's guard against position bias).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_CONFIG = "reward_head.json"
HEAD_FORMAT = "factory-reward-head"
HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def combine(scores: dict[str, float], weights: dict[str, float]) -> float:
    """sum of weight x attribute over the weighted attributes the model has."""
    return float(sum(w * scores[a] for a, w in weights.items() if a in scores))


def weight_problems(attributes: list[str], weights: dict[str, float]) -> list[str]:
    unknown = sorted(set(weights) - set(attributes))
    return [f"weights name attributes the reward model does not have: {', '.join(unknown)} "
            f"(it has {', '.join(attributes)})"] if unknown else []


# --------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------


def save_reward_head(folder: Path, weight, bias, attributes: list[str]) -> None:
    """Write a linear head (A, hidden) next to a causal-LM checkpoint's files."""
    from safetensors.torch import save_file

    if weight.shape[0] != len(attributes) or bias.shape != (len(attributes),):
        raise ValueError(f"head shapes {tuple(weight.shape)} / {tuple(bias.shape)} do not match "
                         f"{len(attributes)} attributes")
    save_file({"weight": weight.float().contiguous(), "bias": bias.float().contiguous()}, str(Path(folder) / HEAD_WEIGHTS))
    (Path(folder) / HEAD_CONFIG).write_text(json.dumps({"format": HEAD_FORMAT, "attributes": list(attributes),
                                                        "pooling": "last_token"}, indent=1))


def init_reward_head(base: Path, out: Path, attributes=HELPSTEER2_ATTRIBUTES, seed: int = 0) -> Path:
    """A reward-model folder: a copy of the checkpoint ``base`` plus a seeded random head."""
    import torch
    from transformers import AutoConfig

    shutil.copytree(base, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
    hidden = AutoConfig.from_pretrained(base).hidden_size
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(len(attributes), hidden, generator=generator) / hidden**0.5
    save_reward_head(out, weight, torch.zeros(len(attributes)), list(attributes))
    return out


class RewardModel:
    """Scores conversations (prompt messages + the response) attribute by attribute."""

    def __init__(self, folder: str | Path, batch_size: int = 8, device: str = "cpu", max_tokens: int = 4096):
        import torch
        from safetensors.torch import load_file
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        import model.architectures  # noqa: F401  registers the factory's own families with the Auto classes
        from model.device import DevicePolicy, inference_dtype
        from sdg.backends import checkpoint_identity

        self.folder = Path(folder)
        self.identity = checkpoint_identity(self.folder)
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.device = DevicePolicy().choose(device, "sdg.generator.device")
        dtype = inference_dtype(self.device)  # bfloat16 on CUDA; the attribute head stays float32
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        if (self.folder / HEAD_CONFIG).is_file():
            head = json.loads((self.folder / HEAD_CONFIG).read_text())
            if head.get("format") != HEAD_FORMAT or not head.get("attributes"):
                raise ValueError(f"{self.folder / HEAD_CONFIG} is not a {HEAD_FORMAT} description with attributes")
            self.attributes = list(head["attributes"])
            tensors = load_file(str(self.folder / HEAD_WEIGHTS))
            self.head = torch.nn.Linear(tensors["weight"].shape[1], len(self.attributes))
            self.head.load_state_dict({"weight": tensors["weight"], "bias": tensors["bias"]})
            self.head.to(self.device).eval()
            self.model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype).to(self.device).eval()
            self.classifier = False
        else:
            config = AutoConfig.from_pretrained(self.folder)
            if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
                raise ValueError(f"{self.folder} is not a reward model: no {HEAD_CONFIG} (a causal LM plus a linear "
                                 "head) and not a *ForSequenceClassification checkpoint")
            self.model = AutoModelForSequenceClassification.from_pretrained(self.folder, dtype=dtype)
            self.model.to(self.device).eval()
            self.attributes = [config.id2label[i] for i in range(config.num_labels)]
            self.classifier = True

    def score(self, conversations: list[list[dict]]) -> list[dict[str, float]]:
        """One {attribute: value} per conversation (its last message is the response)."""
        import torch

        results: list[dict[str, float]] = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = conversations[start : start + self.batch_size]
            with torch.no_grad():
                if self.classifier:  # HF pools the last non-pad token itself
                    batch = encode_conversations(self.tokenizer, chunk, self.max_tokens, self.device)
                    values = self.model(**batch).logits.float()  # (B, A)
                else:
                    pooled = last_token_states(self.model, self.tokenizer, chunk, self.max_tokens)  # (B, H)
                    values = self.head(pooled.float())  # (B, A)
            results += [dict(zip(self.attributes, map(float, row), strict=True)) for row in values.tolist()]
        return results


def encode_conversations(tokenizer, conversations: list[list[dict]], max_tokens: int, device):
    """Conversations rendered with the model's chat format and tokenized as a reward model reads
    them: right padding (causal: the last real token never sees the padding) and truncation from
    the left (the end of a long conversation is the response, what is scored)."""
    from sdg.backends import render_chat

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    texts = [render_chat(tokenizer, c, add_generation_prompt=False) for c in conversations]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens,
                     add_special_tokens=False).to(device)


def last_token_states(model, tokenizer, conversations: list[list[dict]], max_tokens: int):
    """(B, H): a causal LM's final hidden state (after the final norm) at each conversation's
    last real token, in the model's dtype, without gradients: what a reward head reads. One
    function for scoring (``RewardModel.score``) and training (``alignment/reward.py``), so both
    pool the same way."""
    import torch

    batch = encode_conversations(tokenizer, conversations, max_tokens, model.device)
    last = batch["attention_mask"].sum(dim=1) - 1  # (B,) index of each row's last real token
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state  # (B, T, H)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


# --------------------------------------------------------------------------------------
# LLM-as-judge
# --------------------------------------------------------------------------------------

JUDGE_TEMPLATE = (
    "Please act as an impartial judge and compare two responses to the user's request below. Consider "
    "helpfulness, correctness, coherence and level of detail. Do not let the order or the length of the "
    "responses influence you.\n\n[Request]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Answer with [[A]] if response A is better, or [[B]] if response B is better."
)


def render_prompt(messages: list[dict]) -> str:
    return "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages) if len(messages) > 1 \
        else messages[0]["content"]


def judge_messages(messages: list[dict], a: str, b: str) -> list[dict]:
    return [{"role": "user", "content": JUDGE_TEMPLATE.format(prompt=render_prompt(messages), a=a, b=b)}]


def parse_verdict(text: str) -> str | None:
    """"A" or "B" from ``[[A]]`` / ``[[B]]`` (or a bare leading A/B); None when absent or both."""
    found = set(re.findall(r"\[\[\s*([AB])\s*\]\]", text))
    if len(found) == 1:
        return found.pop()
    if not found and (m := re.match(r"^\s*(?:Response\s+)?([AB])\b", text)):
        return m.group(1)
    return None


def agreed_winner(first: str | None, swapped: str | None) -> int | None:
    """Which of (x, y) wins when asked as (A=x, B=y) and then (A=y, B=x): 0, 1, or None
    when a verdict is missing or the two orders disagree (position bias)."""
    if first is None or swapped is None:
        return None
    winner_first = 0 if first == "A" else 1
    winner_swapped = 1 if swapped == "A" else 0
    return winner_first if winner_first == winner_swapped else None
