"""Generator backends: a checkpoint in this process, or an OpenAI-compatible endpoint.

Both take chat requests and yield ``(index, text)`` as results arrive, so the caller can
keep each record the moment it exists (sdg/shards.py):

    backend = LocalGenerator(folder, batch_size=8)              # batched model.generate()
    backend = EndpointGenerator("http://127.0.0.1:8000/v1", max_concurrency=16)
    for i, text in backend.generate_iter([ChatRequest(messages=[...])]): ...

``identity`` names what produced the text (the checkpoint's digest, or the endpoint's URL
and model) and goes into every record's key: another generator never reuses its records.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from model.device import DevicePolicy, inference_dtype
from model.digests import folder_digest
from sdg.shards import record_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict, ...] | list[dict]
    max_new_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.7
    sample: int = 0  # several samples of one prompt differ only here

    def key_parts(self) -> dict:
        return {"messages": list(self.messages), "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "sample": self.sample}


def render_chat(tokenizer, messages, add_generation_prompt: bool) -> str:
    """The conversation as the model reads it: its own chat template (``model/tokenizer.py:
    CHAT_TEMPLATE`` for a checkpoint written before checkpoints carried one)."""
    from model.tokenizer import with_chat_template

    return with_chat_template(tokenizer).apply_chat_template(list(messages), tokenize=False,
                                                             add_generation_prompt=add_generation_prompt)


def checkpoint_identity(folder: Path) -> str:
    """The digest of a checkpoint folder: its manifest's when published, else its files' hash."""
    import json

    manifest = Path(folder) / "manifest.json"
    if manifest.is_file():
        return "checkpoint:" + json.loads(manifest.read_text())["digest"]
    return "checkpoint:" + folder_digest(Path(folder))


# --------------------------------------------------------------------------------------
# In-process
# --------------------------------------------------------------------------------------

# Families whose forward rejects padded batches (Hymba: meta tokens lead every sequence):
# their batches hold prompts of equal token length only.
_NO_PADDING = {"hymba"}


class PerRequestSampler:
    """A logits processor that picks each row's next token from that row's own random stream
    (temperature, then top-p), seeded by ``seed`` and the row's request (``ChatRequest.key_parts``),
    and leaves only that token possible; rows with temperature 0 take the argmax. With greedy
    decoding around it, a request generates the same text in any batch, alone or not."""

    def __init__(self, requests: list[ChatRequest], seed: int = 0):
        self.requests = requests
        self.seeds = [int(record_key("sample", seed, r.key_parts())[:15], 16) for r in requests]
        self.samples = any(r.temperature > 0 for r in requests)
        self._generators = None

    def __call__(self, input_ids, scores):
        import torch

        if self._generators is None:  # on the logits' device (a CUDA generator for CUDA logits)
            self._generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        chosen = scores.argmax(dim=-1)  # (B,)
        for row, (request, generator) in enumerate(zip(self.requests, self._generators, strict=True)):
            if request.temperature <= 0:
                continue
            probs = torch.softmax(scores[row].float() / request.temperature, dim=-1)  # (V,)
            if request.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens
                sorted_probs[before >= request.top_p] = 0.0  # the nucleus: the first token always stays
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            chosen[row] = torch.multinomial(probs, 1, generator=generator)[0]
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen[:, None], 0.0)


class LocalGenerator:
    """A checkpoint folder run here with batched ``model.generate`` (left padding)."""

    def __init__(self, folder: str | Path, batch_size: int = 8, device: str = "auto", seed: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import model.architectures  # noqa: F401  registers the factory's own families (Hymba) with the Auto classes

        self.folder = Path(folder)
        self.identity = checkpoint_identity(self.folder)
        self.batch_size = batch_size
        self.device = DevicePolicy().choose(device, "sdg.generator.device")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.tokenizer.padding_side = "left"  # new tokens follow every prompt directly
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=inference_dtype(self.device))
        self.model.to(self.device).eval()
        self.pads = self.model.config.model_type not in _NO_PADDING
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.seed = seed

    def _batches(self, encoded: list[list[int]]) -> Iterator[list[int]]:
        """Indices grouped into batches, longest prompts first (less padding); equal lengths
        only for models that cannot pad."""
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        if self.pads:
            for start in range(0, len(order), self.batch_size):
                yield order[start : start + self.batch_size]
            return
        by_length: dict[int, list[int]] = {}
        for i in order:
            by_length.setdefault(len(encoded[i]), []).append(i)
        for group in by_length.values():
            for start in range(0, len(group), self.batch_size):
                yield group[start : start + self.batch_size]

    def generate_iter(self, requests: list[ChatRequest]) -> Iterator[tuple[int, str]]:
        import torch

        texts = [render_chat(self.tokenizer, r.messages, add_generation_prompt=True) for r in requests]
        encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        for batch in self._batches(encoded):
            max_new = max(requests[i].max_new_tokens for i in batch)
            room = (self.max_positions - max_new) if self.max_positions else None
            rows = [encoded[i][-room:] if room and room > 0 else encoded[i] for i in batch]  # keep the prompt's end
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)  # (B, T)
            attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            # Each request samples from its own generator, seeded by what decides it: its text does
            # not depend on which requests share its batch (a resumed run batches only the missing
            # ones). Greedy decoding then takes the one token the sampler left.
            sampler = PerRequestSampler([requests[i] for i in batch], self.seed)
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new,
                    do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                    logits_processor=[sampler] if sampler.samples else None,
                    eos_token_id=self.tokenizer.eos_token_id)  # (B, T + new)
            for row, i in enumerate(batch):
                new_tokens = out[row, width : width + requests[i].max_new_tokens]
                yield i, self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    def close(self) -> None:
        del self.model


# --------------------------------------------------------------------------------------
# OpenAI-compatible endpoint
# --------------------------------------------------------------------------------------

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """A request the endpoint refused for good, or that kept failing past its retries."""


@dataclass
class EndpointStats:
    requests: int = 0
    retries: int = 0
    waits: list[float] = field(default_factory=list)  # every backoff, in seconds
    max_in_flight: int = 0


class EndpointGenerator:
    """``POST {base_url}/chat/completions`` with at most ``max_concurrency`` requests in
    flight, a per-request timeout, and retries with exponential backoff (full jitter,
    ``Retry-After`` honoured) on 429, 5xx, timeouts and dropped connections."""

    def __init__(self, base_url: str, model: str = "", *, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 8, timeout_s: float = 120.0, max_retries: int = 6,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, seed: int = 0):
        import httpx

        self.base_url = base_url.rstrip("/")
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        headers = {"Content-Type": "application/json"}
        if key := os.environ.get(api_key_env):
            headers["Authorization"] = f"Bearer {key}"
        self.http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)), headers=headers,
                                 limits=httpx.Limits(max_connections=max_concurrency))
        self.stats = EndpointStats()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._rng = random.Random(seed)
        self.model = model or self._first_model()
        self.identity = f"endpoint:{self.base_url}#{self.model}"

    def _first_model(self) -> str:
        body = self._call("GET", "/models", None)
        models = [m.get("id") for m in body.get("data", []) if m.get("id")]
        if not models:
            raise EndpointError(f"{self.base_url}/models lists no model; set generator.endpoint_model")
        return models[0]

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff_s, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to our own schedule
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        with self._lock:
            return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def _call(self, method: str, path: str, payload: dict | None) -> dict:
        import httpx

        url = self.base_url + path
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            with self._lock:
                self.stats.requests += 1
            try:
                response = self.http.request(method, url, json=payload)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if response.status_code < 300:
                    return response.json()
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUS:
                    raise EndpointError(f"{method} {url} failed with {last}")
                retry_after = response.headers.get("retry-after")
            if attempt == self.max_retries:
                break
            wait = self._backoff(attempt, retry_after)
            with self._lock:
                self.stats.retries += 1
                self.stats.waits.append(wait)
            log.info("%s %s: %s; retry %d in %.1f s", method, url, last, attempt + 1, wait)
            time.sleep(wait)
        raise EndpointError(f"{method} {url} still failing after {self.max_retries} retries: {last}")

    def complete(self, request: ChatRequest) -> str:
        payload = {"model": self.model, "messages": list(request.messages), "max_tokens": request.max_new_tokens,
                   "temperature": request.temperature, "top_p": request.top_p}
        with self._lock:
            self._in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self._in_flight)
        try:
            body = self._call("POST", "/chat/completions", payload)
        finally:
            with self._lock:
                self._in_flight -= 1
        try:
            return (body["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError) as e:
            raise EndpointError(f"{self.base_url}/chat/completions returned no choices[0].message.content: "
                                f"{str(body)[:300]}") from e

    def generate_iter(self, requests: list[ChatRequest]) -> Iterator[tuple[int, str]]:
        """Results as they complete; at most ``max_concurrency`` requests in flight and
        2x that submitted, so a long list never sits in memory as pending futures."""
        with concurrent.futures.ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="sdg-endpoint") as pool:
            pending: dict[concurrent.futures.Future, int] = {}
            queue = iter(range(len(requests)))
            try:
                while True:
                    for i in queue:
                        pending[pool.submit(self.complete, requests[i])] = i
                        if len(pending) >= 2 * self.max_concurrency:
                            break
                    if not pending:
                        return
                    done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        yield pending.pop(future), future.result()
            finally:
                for future in pending:
                    future.cancel()

    def close(self) -> None:
        self.http.close()


def open_generator(spec, folder: Path | None = None, seed: int = 0, device: str | None = None):
    """The backend a GeneratorSpec describes; ``folder`` is its resolved checkpoint, ``device``
    (``cpu`` or ``cuda``) where a local model runs (default: the spec's own choice)."""
    if spec.endpoint is not None:
        return EndpointGenerator(spec.endpoint, spec.endpoint_model, api_key_env=spec.api_key_env,
                                 max_concurrency=spec.max_concurrency, timeout_s=spec.timeout_s,
                                 max_retries=spec.max_retries, backoff_s=spec.backoff_s,
                                 max_backoff_s=spec.max_backoff_s, seed=seed)
    if folder is None:
        raise ValueError(f"generator model {spec.model!r} was not resolved to a checkpoint folder")
    return LocalGenerator(folder, batch_size=spec.batch_size, device=device or spec.device, seed=seed)
