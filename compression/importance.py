"""Activation importance of a Nemotron-H or Hymba model (Minitron / Minitron-SSM).

One calibration pass with forward hooks scores every width axis; depth is scored by the
KL divergence of the logits and the MSE of the final hidden states with one layer removed
(both from the same pass per layer), and by the cheap cosine block importance taken in the
calibration pass.

    axis                  where the hook reads                                   score shape
    hidden ("embedding")  output of every block's RMSNorm (the mixer's input),  (hidden,)
                          summed over layers
    ffn.{i}               output of up_proj (pre-activation; or down_proj input) (intermediate,)
    attention.{i}         attention output before o_proj, L2 per head            (num_heads,)
    mamba.{i}             x slice of in_proj's output, before conv1d             (heads, head_dim)
    layer_kl, layer_mse, layer_cosine                                            (num_layers,)

Mamba scores keep the full (heads, head_dim) matrix: channels are ranked by the L2 over
heads, and heads on the channels a target keeps, so one set of scores serves every target.
Scores are plain tensors in a dict, saved as safetensors and reused; files saved before
``layer_mse`` existed still load and serve every metric but ``mse`` (``layer_score``).

Hymba's hooks and score keys (both RMSNorms of a layer for hidden, SwiGLU's gate_proj, the x
slice and out_proj's input per layer) are in compression/hymba.py; the pass, the aggregation and
the depth scores here are shared. The layer-KL hook replaces a layer's output with its input, so
a Hymba KV producer still hands its K/V to its consumers: exactly what pruning that layer keeps.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from compression.spec import ImportanceSpec
from model.data import PackedTokens
from model.losses import chunked_token_sum, final_hidden, kd_per_token, project

Scores = dict[str, torch.Tensor]


class _ChannelStats:
    """Running statistics of activations (batch, seq, channels) -> one score per channel."""

    def __init__(self, aggregation: str):
        self.aggregation = aggregation
        self.total = self.total_sq = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float()  # (B, L, C)
        if self.aggregation == "variance":
            first, second, n = x.sum((0, 1)), x.pow(2).sum((0, 1)), x.shape[0] * x.shape[1]
        else:
            per_sample = x.abs().mean(1)  # (B, C): mean over the sequence
            first, second, n = per_sample.sum(0), per_sample.pow(2).sum(0), x.shape[0]
        if self.total is None:
            self.total, self.total_sq = first, second
        else:
            self.total, self.total_sq = self.total + first, self.total_sq + second
        self.count += n

    def score(self) -> torch.Tensor:
        if self.aggregation == "l2_mean":
            return self.total_sq.sqrt()  # L2 over the batch of per-sample means
        mean = self.total / self.count
        return mean if self.aggregation == "mean_mean" else self.total_sq / self.count - mean.pow(2)


def _layers(net):
    return net.model.layers


@contextmanager
def _hooks(handles: list):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def calibration_rows(data: PackedTokens, samples: int, seed: int) -> list[int]:
    """A seeded sample of whole rows (the padded last row is never used)."""
    usable = len(data) - 1 if data.valid_tokens(len(data) - 1) < data.seq_len else len(data)
    if usable < 1:
        raise ValueError("no complete calibration sequence in the data")
    order = torch.randperm(usable, generator=torch.Generator().manual_seed(seed))
    return order[: min(samples, usable)].tolist()


def _nemotron_h_hooks(i: int, block, config, spec: ImportanceSpec, record, record_input) -> list:
    """Forward hooks on block ``i`` of a NemotronHForCausalLM (``record`` / ``record_input`` make a
    hook that adds an output / input to the stats of a key)."""
    handles = [block.norm.register_forward_hook(record(f"norm.{i}"))]
    mixer = block.mixer
    if block.block_type == "mlp":
        if spec.ffn_activation == "pre":
            handles.append(mixer.up_proj.register_forward_hook(record(f"ffn.{i}")))
        else:
            handles.append(mixer.down_proj.register_forward_pre_hook(record_input(f"ffn.{i}")))
    elif block.block_type == "full_attention":
        heads, head_dim = config.num_attention_heads, mixer.head_dim

        def per_head_norm(x, heads=heads, head_dim=head_dim):  # (B, L, H*D) -> (B, L, H)
            return x.unflatten(-1, (heads, head_dim)).norm(dim=-1)

        handles.append(mixer.o_proj.register_forward_pre_hook(record_input(f"attention.{i}", per_head_norm)))
    elif block.block_type == "linear_attention":
        # in_proj rows are z | x | B | C | dt; the paper scores the x slice (before conv1d).
        d_inner = config.mamba_num_heads * config.mamba_head_dim
        handles.append(mixer.in_proj.register_forward_hook(
            record(f"mamba.{i}", lambda out: out[..., d_inner : 2 * d_inner])))
    return handles


@torch.no_grad()
def activation_scores(net, data: PackedTokens, spec: ImportanceSpec, device: torch.device | None = None) -> Scores:
    """Width scores and cosine block importance from one calibration pass."""
    device = device or next(net.parameters()).device
    config = net.config
    stats: dict[str, _ChannelStats] = {}
    cosine_sum = torch.zeros(len(_layers(net)), dtype=torch.float64)
    tokens = 0
    handles = []

    def record(key, transform=lambda x: x):
        stats[key] = _ChannelStats(spec.aggregation)
        return lambda module, args, output: stats[key].add(transform(output))

    def record_input(key, transform=lambda x: x):
        stats[key] = _ChannelStats(spec.aggregation)
        return lambda module, args: stats[key].add(transform(args[0]))

    if config.model_type == "hymba":
        from compression.hymba import importance_hooks as block_hooks
    else:
        block_hooks = _nemotron_h_hooks
    for i, block in enumerate(_layers(net)):
        handles += block_hooks(i, block, config, spec, record, record_input)

        def cosine(module, args, output, i=i):
            cos = F.cosine_similarity(args[0].float(), output.float(), dim=-1)  # (B, L)
            cosine_sum[i] += cos.sum().double().cpu()

        handles.append(block.register_forward_hook(cosine))

    was_training = net.training
    net.eval()
    rows = calibration_rows(data, spec.samples, spec.seed)
    with _hooks(handles):
        for start in tqdm(range(0, len(rows), spec.batch_size), desc="importance", leave=False):
            input_ids, _ = data.batch(rows[start : start + spec.batch_size])
            net(input_ids=input_ids.to(device))
            tokens += input_ids.numel()
    net.train(was_training)

    scores: Scores = {}
    hidden = None
    for key, stat in stats.items():
        value = stat.score().cpu()
        if key.startswith("norm."):
            hidden = value if hidden is None else hidden + value
        elif key.startswith("mamba."):
            scores[key] = value.view(config.mamba_num_heads, config.mamba_head_dim)
        else:
            scores[key] = value
    scores["hidden"] = hidden
    scores["layer_cosine"] = (1 - cosine_sum / tokens).float()  # block importance: 1 - E[cos(in, out)]
    return scores


@torch.no_grad()
def layer_removal_scores(net, data: PackedTokens, spec: ImportanceSpec,
                         device: torch.device | None = None) -> Scores:
    """The depth scores of removing one layer at a time, both from the same forward passes:

    ``layer_kl``   KL(full || without layer i) of the next-token distributions, mean per token;
    ``layer_mse``  mean squared error between the full model's final hidden states (after the final
                   norm) and those without layer i, mean over hidden channels and tokens (Minitron's
                   alternative depth score).

    One forward of the full model per batch is the reference, then one per removed layer. Computed
    a chunk of positions at a time (model/losses.py): at 8,192 tokens and a 131,072-token vocabulary
    one sequence's float32 logits alone would be 4 GiB."""
    device = device or next(net.parameters()).device
    layers = _layers(net)
    kl = torch.zeros(len(layers), dtype=torch.float64)
    mse = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    was_training = net.training
    net.eval()
    rows = calibration_rows(data, spec.layer_samples, spec.seed + 1)
    batches = range(0, len(rows), spec.batch_size)
    # Counted in forward passes (num_layers per batch): at 8B and 8K tokens one batch takes minutes.
    progress = tqdm(total=len(batches) * len(layers), desc="layer KL/MSE", unit=" layers", leave=False)
    for start in batches:
        input_ids = data.batch(rows[start : start + spec.batch_size])[0].to(device)
        full, head = final_hidden(net, input_ids)  # (B, L, H)
        full = full.flatten(0, 1)
        every_position = torch.ones(full.shape[0], device=device)

        def kl_per_token(skipped_hidden, full_hidden, head=head):  # (n, H), (n, H) -> (n,): KL(full || skipped)
            return kd_per_token(project(head, skipped_hidden), project(head, full_hidden))

        def mse_per_token(skipped_hidden, full_hidden):  # (n, H), (n, H) -> (n,)
            return (skipped_hidden.float() - full_hidden.float()).pow(2).mean(-1)

        for i, block in enumerate(layers):
            # A forward hook that returns the block's input removes the block from the residual stream.
            handle = block.register_forward_hook(lambda module, args, output: args[0])
            with _hooks([handle]):
                skipped = final_hidden(net, input_ids)[0].flatten(0, 1)
            kl[i] += chunked_token_sum(kl_per_token, [skipped, full], every_position).double().cpu()
            mse[i] += chunked_token_sum(mse_per_token, [skipped, full], every_position).double().cpu()
            progress.update(1)
        tokens += input_ids.numel()
    progress.close()
    net.train(was_training)
    return {"layer_kl": (kl / tokens).float(), "layer_mse": (mse / tokens).float()}


def layer_kl_scores(net, data: PackedTokens, spec: ImportanceSpec, device: torch.device | None = None) -> torch.Tensor:
    """KL(full || without layer i) of the next-token distributions, mean per token, per layer
    (``layer_removal_scores``'s ``layer_kl``)."""
    return layer_removal_scores(net, data, spec, device)["layer_kl"]


def missing_layer_metric(scores: Scores, metric: str) -> str | None:
    """Why ``scores`` cannot rank layers by ``metric`` (None when they can)."""
    key = f"layer_{metric}"
    if key in scores:
        return None
    if metric == "mse":
        return ("layer_metric 'mse' needs the `layer_mse` depth score, and these importance scores have none (they "
                "were saved before it existed): rerun the importance stage (compress.importance) to recompute "
                "them, or choose layer_metric 'kl' or 'cosine'")
    return f"layer_metric {metric!r} needs the `{key}` depth score, and these importance scores have none"


def layer_score(scores: Scores, metric: str) -> torch.Tensor:
    """The per-layer depth score ``layer_metric`` names (``kl``, ``cosine`` or ``mse``); a clear
    error for score files without it (``layer_mse`` is absent from scores saved before it existed)."""
    if (problem := missing_layer_metric(scores, metric)) is not None:
        raise ValueError(problem)
    return scores[f"layer_{metric}"]


def random_scores(config, seed: int) -> Scores:
    """Seeded noise with the shapes of real scores: the baseline importance must beat."""
    generator = torch.Generator().manual_seed(seed)

    def noise(*shape):
        return torch.rand(*shape, generator=generator)

    if config.model_type == "hymba":
        from compression.hymba import score_shapes

        scores = {key: noise(*shape) for key, shape in score_shapes(config).items() if key != "layer_cosine"}
        return scores | {"layer_cosine": scores["layer_kl"].clone(), "layer_mse": scores["layer_kl"].clone()}

    scores: Scores = {"hidden": noise(config.hidden_size)}
    for i, kind in enumerate(config.layers_block_type):
        if kind == "mlp":
            scores[f"ffn.{i}"] = noise(config.intermediate_size)
        elif kind == "full_attention":
            scores[f"attention.{i}"] = noise(config.num_attention_heads)
        elif kind == "linear_attention":
            scores[f"mamba.{i}"] = noise(config.mamba_num_heads, config.mamba_head_dim)
    scores["layer_kl"] = noise(len(config.layers_block_type))
    scores["layer_cosine"] = scores["layer_kl"].clone()
    scores["layer_mse"] = scores["layer_kl"].clone()
    return scores


def estimate_importance(net, data: PackedTokens, spec: ImportanceSpec) -> Scores:
    """Every axis's scores for ``net`` on calibration rows of ``data`` (or seeded noise)."""
    if spec.method == "random":
        return random_scores(net.config, spec.seed)
    scores = activation_scores(net, data, spec)
    return scores | layer_removal_scores(net, data, spec)


def save_scores(scores: Scores, path: Path, metadata: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp), metadata={"factory": json.dumps(metadata)})
    tmp.replace(path)


def load_scores(path: Path) -> tuple[Scores, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get("factory", "{}"))
    return load_file(str(path)), metadata
