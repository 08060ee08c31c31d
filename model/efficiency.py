"""Inference efficiency: prefill and decode tokens/s, cache bytes, peak memory.

One measurement point is (batch size B, context length L): a prefill of B x L random
tokens with ``use_cache=True``, then ``decode_tokens`` greedy steps of one token each
through the returned cache. Throughput is tokens over the median of ``repeats`` timed
runs, after ``warmup`` untimed ones. On CUDA the clock is a pair of CUDA events around the
work (the GPU's own time, no host jitter); on CPU it is ``time.perf_counter``.

Cache bytes are counted on the cache object the model itself returns (for Nemotron-H in
transformers 5: a ``DynamicCache`` whose Mamba layers hold a conv state (B, conv_dim, K)
and an SSM state (B, H, P, N) in float32, and whose attention layers hold K and V
(B, kv_heads, L, head_dim)); ``analytic_cache_bytes`` is the same count from the config
alone, and a test holds the two equal.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before the point); on
Linux CPUs the process's peak resident set (VmHWM, reset through /proc/self/clear_refs
before the point), which includes the weights and everything else the process holds;
elsewhere the process's lifetime peak RSS (``ru_maxrss``). The kind is reported with the number.
"""

from __future__ import annotations

import inspect
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Attribute names of cache classes (transformers 5 DynamicCache layers, the older
# HybridMambaAttentionDynamicCache, model/hymba's HymbaCache) -> what the tensor holds.
_CACHE_KINDS = {"keys": "attention_kv", "values": "attention_kv", "key_cache": "attention_kv",
                "value_cache": "attention_kv", "conv_states": "conv_state", "recurrent_states": "ssm_state",
                "ssm_states": "ssm_state", "conv_state": "conv_state", "ssm_state": "ssm_state"}  # + model/hymba


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


# --------------------------------------------------------------------------------------
# Cache bytes: measured and analytic
# --------------------------------------------------------------------------------------


def cache_tensors(cache) -> dict[str, list[torch.Tensor]]:
    """Every tensor a cache object holds, grouped by kind (attention_kv, conv_state, ssm_state, other).

    Walks the object's attributes, lists and dicts, so it works for any of transformers'
    cache classes; a tensor reachable twice is counted once, and a 0-dimensional one (a
    position counter such as transformers 5.25's ``cumulative_length_linear``) is bookkeeping,
    not cached state."""
    found: dict[str, list[torch.Tensor]] = defaultdict(list)
    seen_objects, seen_tensors = set(), set()

    def visit(value, kind: str, depth: int) -> None:
        if depth > 6 or id(value) in seen_objects:
            return
        seen_objects.add(id(value))
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), value.numel())
            if value.dim() and value.numel() and key not in seen_tensors:
                seen_tensors.add(key)
                found[kind].append(value)
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item, kind, depth + 1)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item, kind, depth + 1)
        elif hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module | type):
            for name, item in vars(value).items():
                visit(item, _CACHE_KINDS.get(name, kind), depth + 1)

    visit(cache, "other", 0)
    return dict(found)


def measured_cache_bytes(cache) -> dict[str, int]:
    """Bytes held by a cache object, by kind, plus ``total``."""
    by_kind = {kind: sum(t.numel() * t.element_size() for t in tensors) for kind, tensors in cache_tensors(cache).items()}
    return by_kind | {"total": sum(by_kind.values())}


def analytic_cache_bytes(config, context_length: int, batch_size: int, dtype: torch.dtype,
                         ssm_dtype: torch.dtype = torch.float32) -> dict[str, int] | None:
    """The cache size from the config alone (model/cost.py), by kind; None for a family the
    cost model does not cover (Hymba: windows, shared K/V, meta tokens).

    The SSM state defaults to float32, what transformers allocates."""
    from model.cost import kv_cache_bytes, layer_types, mamba_state_bytes

    if layer_types(config) is None:
        return None
    conv, ssm = mamba_state_bytes(config, batch_size, dtype, ssm_dtype)
    out = {"attention_kv": int(kv_cache_bytes(config, context_length, batch_size, dtype)),
           "conv_state": int(conv), "ssm_state": int(ssm)}
    return {k: v for k, v in out.items() if v} | {"total": sum(out.values())}


# --------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------


class Timer:
    """Seconds of device work between ``start()`` and ``stop()``: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._begin = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
            return self._begin.elapsed_time(self._end) / 1000
        return time.perf_counter() - self._begin


_HWM = re.compile(r"VmHWM:\s+(\d+) kB")


def reset_peak_memory(device: torch.device) -> str:
    """Start a peak-memory window; returns how peak memory will be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the resident-set high-water mark
        return "process_peak_rss"
    except OSError:
        return "process_lifetime_peak_rss"


def peak_memory_bytes(device: torch.device, kind: str) -> int:
    if kind == "cuda_max_memory_allocated":
        return torch.cuda.max_memory_allocated(device)
    if kind == "process_peak_rss":
        return int(_HWM.search(Path("/proc/self/status").read_text()).group(1)) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


# --------------------------------------------------------------------------------------
# Prefill and decode
# --------------------------------------------------------------------------------------


def _cache_kwarg(model) -> str:
    """transformers 5.x names the cache argument ``cache``; earlier releases ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(output):
    return output.get("cache", None) or output.get("past_key_values", None)


@torch.no_grad()
def prefill_and_decode(model, input_ids: torch.Tensor, decode_tokens: int, timer: Timer | None = None):
    """One prefill, then greedy one-token steps through the cache the model returns.

    Returns (prefill seconds, decode seconds, the cache right after the prefill measured in
    bytes, the cache object at the end)."""
    cache_arg = _cache_kwarg(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    timer = timer or Timer(input_ids.device)
    timer.start()
    out = model(input_ids=input_ids, use_cache=True, **extra)
    prefill_s = timer.stop()
    cache = _returned_cache(out)
    if cache is None:
        raise RuntimeError(f"{type(model).__name__} returned no cache with use_cache=True; cannot decode incrementally")
    prefill_cache = measured_cache_bytes(cache)
    next_ids = out.logits[:, -1:].argmax(-1)  # (B, 1)
    timer.start()
    for _ in range(decode_tokens):
        out = model(input_ids=next_ids, use_cache=True, **{cache_arg: cache}, **extra)
        cache = _returned_cache(out)
        next_ids = out.logits[:, -1:].argmax(-1)
    decode_s = timer.stop()
    return prefill_s, decode_s, prefill_cache, cache


def measure_point(model, batch_size: int, context_length: int, decode_tokens: int, warmup: int, repeats: int,
                  device: torch.device, seed: int = 0) -> dict:
    """Throughput, cache bytes and peak memory at one (batch, context) point."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch_size, context_length), generator=generator).to(device)
    model.eval()
    timer = Timer(device)
    memory_kind = reset_peak_memory(device)
    for _ in range(warmup):
        prefill_and_decode(model, input_ids, decode_tokens, timer)
    prefills, decodes = [], []
    for _ in range(repeats):
        prefill_s, decode_s, cache_bytes, _ = prefill_and_decode(model, input_ids, decode_tokens, timer)
        prefills.append(prefill_s)
        decodes.append(decode_s)
    analytic = analytic_cache_bytes(model.config, context_length, batch_size, model.dtype)
    return {
        "batch_size": batch_size,
        "context_length": context_length,
        "decode_tokens": decode_tokens,
        "prefill_seconds": statistics.median(prefills),
        "decode_seconds": statistics.median(decodes),
        "prefill_tokens_per_s": batch_size * context_length / statistics.median(prefills),
        "decode_tokens_per_s": batch_size * decode_tokens / statistics.median(decodes),
        "cache_bytes": cache_bytes["total"],
        "cache_bytes_per_sequence": cache_bytes["total"] // batch_size,
        "cache_bytes_by_kind": {k: v for k, v in cache_bytes.items() if k != "total"},
        "analytic_cache_bytes": analytic["total"] if analytic else None,
        "peak_memory_bytes": peak_memory_bytes(device, memory_kind),
        "peak_memory_kind": memory_kind,
    }


def measure_efficiency(model, batch_sizes: list[int], context_lengths: list[int], decode_tokens: int = 16,
                       warmup: int = 1, repeats: int = 3, device: torch.device | None = None) -> dict:
    """Every (batch, context) point, plus where it ran."""
    device = device or next(model.parameters()).device
    points = [measure_point(model, b, length, decode_tokens, warmup, repeats, device)
              for b, length in tqdm([(b, length) for b in batch_sizes for length in context_lengths],
                                    desc="efficiency", leave=False)]
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(model.dtype).removeprefix("torch."), "clock": "cuda_events" if device.type == "cuda" else "perf_counter",
            "torch_threads": torch.get_num_threads(), "points": points}


# --------------------------------------------------------------------------------------
# Where decode time goes
# --------------------------------------------------------------------------------------


@torch.no_grad()
def profile_decode(model, batch_size: int, context_length: int, decode_tokens: int, device: torch.device,
                   top_ops: int = 12) -> dict:
    """torch.profiler over the decode steps: total time per module class (each decoder
    block's children, the embedding and the LM head) and the top operators by self time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    blocks = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    watched = [child for block in blocks for child in block.children()]
    watched += [model.get_input_embeddings(), model.get_output_embeddings()]
    handles, open_ranges = [], {}

    def before(module, args):
        open_ranges[id(module)] = record_function(f"module::{type(module).__name__}")
        open_ranges[id(module)].__enter__()

    def after(module, args, output):
        open_ranges.pop(id(module)).__exit__(None, None, None)

    for module in watched:
        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    input_ids = torch.randint(3, model.config.vocab_size, (batch_size, context_length), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        _, _, _, cache = prefill_and_decode(model, input_ids, 1)  # a warm cache to decode from
        next_ids = input_ids[:, -1:]
        with profile(activities=activities) as prof:
            with record_function("decode"):
                for _ in range(decode_tokens):
                    out = model(input_ids=next_ids, use_cache=True, **{_cache_kwarg(model): cache})
                    cache, next_ids = _returned_cache(out), out.logits[:, -1:].argmax(-1)
    finally:
        for handle in handles:
            handle.remove()
    events = prof.key_averages()
    time_attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    total = next(e for e in events if e.key == "decode")
    modules = {e.key.removeprefix("module::"): getattr(e, time_attr) / 1e6 for e in events if e.key.startswith("module::")}
    ops = sorted((e for e in events if not e.key.startswith("module::") and e.key != "decode"),
                 key=lambda e: e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total, reverse=True)
    return {
        "decode_seconds": getattr(total, time_attr) / 1e6 if device.type == "cuda" else total.cpu_time_total / 1e6,
        "by_module_seconds": dict(sorted(modules.items(), key=lambda kv: -kv[1])),
        "top_ops": [{"op": e.key, "self_seconds": (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total) / 1e6,
                     "calls": e.count} for e in ops[:top_ops]],
    }
