# N=calibration tokens, E=hidden size, I=dense intermediate size, X=experts, n=neurons per expert, S=shared neurons
"""MoEfication (Zhang et al., arXiv 2110.01786): a real MoE model from a dense one's own weights.

Each dense SwiGLU MLP, out = W_down (silu(W_gate x) * (W_up x)), is a sum over its I neurons. Split the neurons
into X experts of n and a few always-on shared ones, route each token to k experts, and the layer computes only
k * n + S of its I neurons. What decides the quality is which neurons go together and how well the router guesses
which experts matter for a token:

1. **Calibration, layer by layer.** The model reads local text and layer L's MLP input is kept ([N, E]), with
   layers before L already converted: each layer is fitted to the inputs the MoE model will really give it.
2. **Shared neurons.** The S neurons with the largest mean |activation| are always on (they fire for every token).
3. **Experts by co-activation.** Each remaining neuron is a point: its |activation| profile over the calibration
   tokens, unit-normalised. Balanced k-means (every cluster exactly n neurons: assignments are made greedily by
   distance with a capacity per cluster) groups neurons that fire on the same tokens.
4. **Routers.** An expert's worth for a token is the norm of its output, ||W_down[:, e] a_e||. A linear router per
   layer (on the MLP input, like any MoE gate) is trained with a listwise cross-entropy against those worths
   normalised per token: it learns to rank the experts.
5. **Expert tuning.** A SwiGLU MLP is not sparse the way the ReLU ones MoEfication was made for: cut to a few
   experts it loses much of its output. So the experts and the shared expert are then fitted (Adam, a few hundred
   steps) to reproduce the dense MLP's output on the calibration tokens, each token through the experts its
   router picks: local distillation, minutes on a CPU for the whole model.
6. **The checkpoint** is written in Qwen2-MoE's layout (transformers loads it; so does tierserve): the shared
   neurons are the shared expert, its sigmoid gate held at 0.5 (weights 0) with the factor 2 folded into its
   down projection. MoEfication sums the chosen experts unweighted; Qwen2-MoE weights each by its softmax
   probability (top-k not renormalised). The router's logits are divided by `temperature` (1e4), so every
   probability is 1/X to within ~1e-3 relative while the top-k order is the trained one, and each expert's down
   projection carries the factor X. So one checkpoint serves any top-k (the config's is the default).

   That is the `flat` router weighting. It throws away the router's confidence, which dMoE's block coresets and
   REAP's gate term read. The `confident` weighting keeps it: the logits stay as trained, the top-k weights are
   renormalised (norm_topk_prob), each expert's down projection carries the factor k (so equal weights give the
   unweighted sum), and the experts are tuned under their real weights. Its checkpoint is the model at its own
   top-k only: at another k' the weights sum to 1 over k' experts and the output scales by k / k'.

Attention, norms and embeddings are the dense model's, untouched.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from workers.attention import AttentionMetadata, PrefillChunk
from workers.kv.codecs import IdentityCodec
from workers.model.loader import LoadedModel


@dataclass(frozen=True)
class MoefyConfig:
    num_experts: int = 64
    top_k: int = 8
    shared_neurons: int = 256  # SmolLM2: 1536 = 256 + 64 experts x 20 (widths of 4k: transformers' grouped GEMM)
    kmeans_iterations: int = 10
    profile_tokens: int = 4096  # calibration tokens in a neuron's co-activation profile
    router_steps: int = 400
    router_lr: float = 3e-3
    tune_steps: int = 200  # expert tuning: Adam steps per layer (0: the experts stay the dense model's slices)
    tune_lr: float = 1e-3
    tune_batch: int = 1024
    temperature: float = 1e4
    router_weighting: str = "flat"  # flat | confident (see the module doc)
    seed: int = 0


# ---- running the dense model ------------------------------------------------------------------------------------
def window_logits(loaded: LoadedModel, token_ids: list[int],
                  on_mlp_input: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """One window prefilled through the paged path: logits [T, V]; on_mlp_input(layer, x [T, E]) sees every MLP's
    input on the way."""
    config = loaded.config
    block_size = 16
    num_blocks = -(-len(token_ids) // block_size)
    codec = IdentityCodec(torch.float32, config.num_kv_heads, config.head_dim)
    pages = [codec.allocate(layer, num_blocks, block_size, torch.device("cpu")) for layer in range(config.num_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(len(token_ids)), num_decode_tokens=0, decode_block_tables=None,
                             decode_seq_lens=None,
                             prefills=(PrefillChunk(0, len(token_ids), 0, torch.arange(num_blocks)),))
    hooks = []
    if on_mlp_input is not None:
        for index, layer in enumerate(loaded.model.layers):
            hooks.append(layer.mlp.register_forward_pre_hook(
                lambda module, args, index=index: on_mlp_input(index, args[0].detach().clone())))
    try:
        with torch.inference_mode():
            hidden = loaded.model(torch.tensor(token_ids), torch.arange(len(token_ids)), pages, codec, meta)
            return loaded.model.compute_logits(hidden)
    finally:
        for hook in hooks:
            hook.remove()


def perplexity(loaded: LoadedModel, windows: list[list[int]]) -> float:
    """exp(mean next-token negative log-likelihood) over the windows."""
    total, count = 0.0, 0
    for window in windows:
        logits = window_logits(loaded, window)
        total += float(F.cross_entropy(logits[:-1], torch.tensor(window[1:]), reduction="sum"))
        count += len(window) - 1
    return float(torch.exp(torch.tensor(total / count)))


class _Captured(Exception):
    """Raised by the capture hook once it has its layer's input: the layers after it need not run."""


def capture_mlp_input(loaded: LoadedModel, windows: list[list[int]], layer: int) -> torch.Tensor:
    """Layer `layer`'s MLP input over the windows [N, E] (the forward stops there)."""
    captured: list[torch.Tensor] = []

    def keep(index: int, x: torch.Tensor) -> None:
        if index == layer:
            captured.append(x)
            raise _Captured

    for window in windows:
        try:
            window_logits(loaded, window, keep)
        except _Captured:
            pass
    return torch.cat(captured)


# ---- splitting one MLP --------------------------------------------------------------------------------------------
def mlp_weights(mlp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_gate [I, E], W_up [I, E], W_down [E, I]) of a dense MLP."""
    gate, up = mlp.gate_up_proj.weight.detach().float().split(mlp.intermediate_size)
    return gate, up, mlp.down_proj.weight.detach().float()


def activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[N, E] -> the neurons' activations [N, I]."""
    return F.silu(x @ gate.t()) * (x @ up.t())


def balanced_kmeans(points: torch.Tensor, num_clusters: int, iterations: int, seed: int) -> torch.Tensor:
    """points [P, d] unit rows -> cluster of each point [P], every cluster exactly P / num_clusters points."""
    num_points = points.shape[0]
    size = num_points // num_clusters
    assert size * num_clusters == num_points, f"{num_points} points do not split into {num_clusters} equal clusters"
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(num_points, generator=generator)[:num_clusters]].clone()
    assignment = torch.zeros(num_points, dtype=torch.long)
    for _ in range(iterations):
        similarity = points @ centroids.t()  # [P, X] cosine (unit rows)
        # Greedy under capacity: the most confident (point, cluster) pairs first.
        order = torch.argsort(similarity.flatten(), descending=True)
        room = [size] * num_clusters
        placed = torch.zeros(num_points, dtype=torch.bool)
        remaining = num_points
        for flat in order.tolist():
            point, cluster = divmod(flat, num_clusters)
            if placed[point] or not room[cluster]:
                continue
            assignment[point] = cluster
            placed[point] = True
            room[cluster] -= 1
            remaining -= 1
            if not remaining:
                break
        for cluster in range(num_clusters):
            centroid = points[assignment == cluster].mean(dim=0)
            centroids[cluster] = centroid / centroid.norm().clamp_min(1e-12)
    return assignment


@dataclass(frozen=True)
class LayerSplit:
    router: torch.Tensor  # [X, E] trained router weights (before the temperature)
    experts_gate_up: torch.Tensor  # [X, 2n, E] (gate rows, then up rows), each token's output weighted 1
    experts_down: torch.Tensor  # [X, E, n]
    shared_gate_up: torch.Tensor  # [2S, E]
    shared_down: torch.Tensor  # [E, S]
    router_top1: float  # how often the router's first choice is the most valuable expert (calibration tokens)
    kept_worth: float  # the share of the routed experts' output norm the top-k choice keeps, on average
    error_before: float  # the layer's output error relative to the dense MLP's (mean over tokens), sliced experts
    error_after: float  # ... after tuning


def split_layer(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, config: MoefyConfig
                ) -> LayerSplit:
    acts = activations(x, gate, up)  # [N, I]
    magnitude = acts.abs()
    shared = torch.argsort(magnitude.mean(dim=0), descending=True)[:config.shared_neurons]
    routed = torch.ones(acts.shape[1], dtype=torch.bool)
    routed[shared] = False
    routed_ids = routed.nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(config.seed)
    sample = torch.randperm(acts.shape[0], generator=generator)[:config.profile_tokens]
    profiles = magnitude[sample][:, routed_ids].t()  # [I - S, tokens]
    profiles = profiles / profiles.norm(dim=1, keepdim=True).clamp_min(1e-12)
    assignment = balanced_kmeans(profiles, config.num_experts, config.kmeans_iterations, config.seed)
    experts = torch.stack([routed_ids[assignment == cluster] for cluster in range(config.num_experts)])  # [X, n]
    # Each expert's output norm per token: what the router must rank.
    worth = torch.stack([(acts[:, ids] @ down[:, ids].t()).norm(dim=1) for ids in experts], dim=1)  # [N, X]
    router = train_router(x, worth, config)
    with torch.no_grad():
        logits = x @ router.t()
        chosen = logits.topk(config.top_k, dim=1).indices
        top1 = float((logits.argmax(dim=1) == worth.argmax(dim=1)).float().mean())
        kept = float((worth.gather(1, chosen).sum(dim=1) / worth.sum(dim=1).clamp_min(1e-12)).mean())
    target = acts @ down.t()  # [N, E] the dense MLP's output
    weights = {"experts_gate_up": torch.stack([torch.cat([gate[ids], up[ids]]) for ids in experts]),
               "experts_down": torch.stack([down[:, ids] for ids in experts]),
               "shared_gate_up": torch.cat([gate[shared], up[shared]]), "shared_down": down[:, shared]}
    scales = routing_scales(logits, chosen, config)
    error_before = _relative_error(x, chosen, scales, target, weights)
    if config.tune_steps:
        weights = tune_experts(x, chosen, scales, target, weights, config)
    return LayerSplit(router=router, router_top1=top1, kept_worth=kept, error_before=error_before,
                      error_after=_relative_error(x, chosen, scales, target, weights), **weights)


def routing_scales(logits: torch.Tensor, chosen: torch.Tensor, config: MoefyConfig) -> torch.Tensor:
    """[N, k] what each chosen expert's output is multiplied by in the checkpoint: 1 (flat), or k times its
    renormalised top-k probability (confident)."""
    if config.router_weighting == "flat":
        return torch.ones(chosen.shape, dtype=torch.float32)
    picked = torch.softmax(logits.float(), dim=-1).gather(1, chosen)
    return picked / picked.sum(dim=1, keepdim=True) * config.top_k


def moefied_mlp(x: torch.Tensor, expert_ids: torch.Tensor, scales: torch.Tensor, weights: dict) -> torch.Tensor:
    """The converted layer: the shared expert plus each token's chosen experts, each times its scale [T, k] (see
    routing_scales). The experts' weights
    are stacked tensors, or lists of one tensor per expert (training: autograd then keeps a small gradient per
    expert instead of a full stacked-size one for every slice taken)."""
    gate, up = (x @ weights["shared_gate_up"].t()).chunk(2, dim=-1)
    out = (F.silu(gate) * up) @ weights["shared_down"].t()
    top_k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = order // top_k
    row_scales = scales.reshape(-1)[order].to(x.dtype)[:, None]
    counts = torch.bincount(flat, minlength=len(weights["experts_gate_up"])).tolist()
    rows = x.index_select(0, tokens)  # [T*k, E] grouped by expert
    routed = []
    start = 0
    for expert, count in enumerate(counts):
        if count:
            gate, up = (rows[start:start + count] @ weights["experts_gate_up"][expert].t()).chunk(2, dim=-1)
            routed.append((F.silu(gate) * up) @ weights["experts_down"][expert].t())
            start += count
    return out.index_add(0, tokens, torch.cat(routed) * row_scales)


def _relative_error(x, expert_ids, scales, target, weights) -> float:
    with torch.no_grad():
        out = moefied_mlp(x, expert_ids, scales, weights)
        return float(((out - target).norm(dim=1) / target.norm(dim=1).clamp_min(1e-12)).mean())


def tune_experts(x: torch.Tensor, expert_ids: torch.Tensor, scales: torch.Tensor, target: torch.Tensor,
                 weights: dict[str, torch.Tensor], config: MoefyConfig) -> dict[str, torch.Tensor]:
    """Fit the experts and the shared expert to the dense output, each token through its routed experts."""
    params = {"shared_gate_up": weights["shared_gate_up"].clone().requires_grad_(True),
              "shared_down": weights["shared_down"].clone().requires_grad_(True),
              "experts_gate_up": [w.clone().requires_grad_(True) for w in weights["experts_gate_up"]],
              "experts_down": [w.clone().requires_grad_(True) for w in weights["experts_down"]]}
    leaves = [params["shared_gate_up"], params["shared_down"], *params["experts_gate_up"], *params["experts_down"]]
    optimizer = torch.optim.Adam(leaves, lr=config.tune_lr)
    generator = torch.Generator().manual_seed(config.seed)
    scale = target.pow(2).mean()
    with torch.enable_grad():
        for _ in range(config.tune_steps):
            batch = torch.randint(0, x.shape[0], (min(config.tune_batch, x.shape[0]),), generator=generator)
            optimizer.zero_grad()
            out = moefied_mlp(x[batch], expert_ids[batch], scales[batch], params)
            loss = (out - target[batch]).pow(2).mean() / scale
            loss.backward()
            optimizer.step()
    return {"shared_gate_up": params["shared_gate_up"].detach(), "shared_down": params["shared_down"].detach(),
            "experts_gate_up": torch.stack([w.detach() for w in params["experts_gate_up"]]),
            "experts_down": torch.stack([w.detach() for w in params["experts_down"]])}


def train_router(x: torch.Tensor, worth: torch.Tensor, config: MoefyConfig) -> torch.Tensor:
    """A linear router [X, E] trained to rank the experts by worth (listwise cross-entropy)."""
    generator = torch.Generator().manual_seed(config.seed)
    weight = (torch.randn(worth.shape[1], x.shape[1], generator=generator) * 0.01).requires_grad_(True)
    target = worth / worth.sum(dim=1, keepdim=True).clamp_min(1e-12)  # [N, X]
    optimizer = torch.optim.Adam([weight], lr=config.router_lr)
    with torch.enable_grad():
        for _ in range(config.router_steps):
            optimizer.zero_grad()
            loss = -(target * torch.log_softmax(x @ weight.t(), dim=1)).sum(dim=1).mean()
            loss.backward()
            optimizer.step()
    return weight.detach()


# ---- the checkpoint -----------------------------------------------------------------------------------------------
def moe_state_dict(loaded: LoadedModel, splits: list[LayerSplit], config: MoefyConfig) -> dict[str, torch.Tensor]:
    """Qwen2-MoE names and shapes (see the module doc for the temperature and the folded factors)."""
    model = loaded.model
    model_config = loaded.config
    tensors = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if not model_config.tie_word_embeddings:
        tensors["lm_head.weight"] = model.lm_head.weight
    q_size = model_config.num_heads * model_config.head_dim
    kv_size = model_config.num_kv_heads * model_config.head_dim
    for index, (layer, split) in enumerate(zip(model.layers, splits)):
        prefix = f"model.layers.{index}"
        attention = layer.self_attn
        q, k, v = attention.qkv_proj.weight.split((q_size, kv_size, kv_size))
        tensors.update({
            f"{prefix}.input_layernorm.weight": layer.input_layernorm.weight,
            f"{prefix}.post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
            f"{prefix}.self_attn.q_proj.weight": q, f"{prefix}.self_attn.k_proj.weight": k,
            f"{prefix}.self_attn.v_proj.weight": v, f"{prefix}.self_attn.o_proj.weight": attention.o_proj.weight,
        })
        if attention.qkv_proj.bias is not None:
            q_bias, k_bias, v_bias = attention.qkv_proj.bias.split((q_size, kv_size, kv_size))
            tensors.update({f"{prefix}.self_attn.q_proj.bias": q_bias, f"{prefix}.self_attn.k_proj.bias": k_bias,
                            f"{prefix}.self_attn.v_proj.bias": v_bias})
        flat = config.router_weighting == "flat"
        tensors[f"{prefix}.mlp.gate.weight"] = split.router / config.temperature if flat else split.router
        down_factor = config.num_experts if flat else config.top_k
        for expert in range(config.num_experts):
            gate, up = split.experts_gate_up[expert].chunk(2)
            tensors[f"{prefix}.mlp.experts.{expert}.gate_proj.weight"] = gate
            tensors[f"{prefix}.mlp.experts.{expert}.up_proj.weight"] = up
            tensors[f"{prefix}.mlp.experts.{expert}.down_proj.weight"] = split.experts_down[expert] * down_factor
        gate, up = split.shared_gate_up.chunk(2)
        tensors[f"{prefix}.mlp.shared_expert.gate_proj.weight"] = gate
        tensors[f"{prefix}.mlp.shared_expert.up_proj.weight"] = up
        tensors[f"{prefix}.mlp.shared_expert.down_proj.weight"] = split.shared_down * 2.0  # sigmoid(0) = 0.5
        tensors[f"{prefix}.mlp.shared_expert_gate.weight"] = torch.zeros(1, model_config.hidden_size)
    return {name: tensor.detach().float().contiguous().clone() for name, tensor in tensors.items()}


def moe_hf_config(loaded: LoadedModel, splits: list[LayerSplit], config: MoefyConfig) -> dict:
    model_config = loaded.config
    tokenizer = loaded.tokenizer
    return {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "vocab_size": model_config.vocab_size, "hidden_size": model_config.hidden_size,
        "intermediate_size": model_config.intermediate_size, "num_hidden_layers": model_config.num_layers,
        "num_attention_heads": model_config.num_heads, "num_key_value_heads": model_config.num_kv_heads,
        "head_dim": model_config.head_dim, "hidden_act": "silu", "rms_norm_eps": model_config.rms_norm_eps,
        "rope_theta": model_config.rope_theta, "max_position_embeddings": model_config.max_position_embeddings,
        "tie_word_embeddings": model_config.tie_word_embeddings, "qkv_bias": model_config.qkv_bias,
        "num_experts": config.num_experts, "num_experts_per_tok": config.top_k,
        "moe_intermediate_size": int(splits[0].experts_down.shape[2]),
        "shared_expert_intermediate_size": config.shared_neurons,
        "norm_topk_prob": config.router_weighting == "confident",
        "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False, "sliding_window": None,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "float32",
        "tierserve_moefy": asdict(config),
    }


def write_checkpoint(loaded: LoadedModel, splits: list[LayerSplit], config: MoefyConfig, out_dir: str) -> None:
    from safetensors.torch import save_file

    if loaded.config.rope_scaling.rope_type != "default":
        raise ValueError("moefy: the dense model's RoPE scaling is not carried into the checkpoint yet")
    os.makedirs(out_dir, exist_ok=True)
    save_file(moe_state_dict(loaded, splits, config), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(moe_hf_config(loaded, splits, config), f, indent=2)
    loaded.tokenizer.save_hf_dir(out_dir)


class ConvertedMLP(torch.nn.Module):
    """A converted layer inside the dense model while the next layers are fitted: what the checkpoint computes (flat:
    up to the temperature's ~1e-3, each chosen expert weighted exactly 1 here)."""

    def __init__(self, split: LayerSplit, config: MoefyConfig):
        super().__init__()
        self.split = split
        self.config = config

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        split = self.split
        logits = hidden.float() @ split.router.t()
        expert_ids = logits.topk(self.config.top_k, dim=1).indices
        weights = {"experts_gate_up": split.experts_gate_up, "experts_down": split.experts_down,
                   "shared_gate_up": split.shared_gate_up, "shared_down": split.shared_down}
        scales = routing_scales(logits, expert_ids, self.config)
        return moefied_mlp(hidden.float(), expert_ids, scales, weights).to(hidden.dtype)
