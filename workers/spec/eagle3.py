"""EAGLE-3 draft head (Li et al. 2025), in the checkpoint layout vLLM and SGLang load (`LlamaForCausalLMEagle3`).

The head reads three of the target's hidden states (the residual stream entering layers `aux_layer_ids`, by
default 2, L/2 and L-3: low, middle and high features), fuses them with `fc` into one hidden-size vector, and
runs ONE decoder layer whose attention input is [input_layernorm(embed(next token)); hidden_norm(fused)]
(2E wide). Its pre-norm output is both the residual for the next draft step (fed back in place of the fused
target features: drafting steps 2..k run on the head's own states) and, after `norm`, the input of a reduced
lm_head over `draft_vocab_size` tokens; `d2t` maps a draft id to the target's (target = draft + d2t[draft]),
`t2d` marks the target tokens the draft vocabulary has. The token embedding is the target's (shared, frozen).

EAGLE 3.1 options (top-level config keys, as vLLM reads them): `fc_norm` RMS-normalises each captured state before
fc (`fc_norm.{0,1,2}`; the three layers' scales differ by orders of magnitude), and `norm_output` feeds back the
head's NORMED output instead of the pre-norm one (logits always use the normed one). The captured layers are
`eagle_aux_hidden_state_layer_ids`, taken as vLLM takes them: the residual stream ENTERING each listed layer.

Pure torch: the same module trains (workers/spec/eagle3_train.py) and drafts (workers/spec/eagle3_drafter.py).

# B=batch, T=positions, E=hidden, Et=target hidden, C=captured layers (3), H/Hkv=heads, D=head dim, Vd=draft vocab
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fused_ops import reference_rope

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """vLLM's default (2, L/2, L-3): low, middle and high features (clamped into range for toy models)."""
    return tuple(min(max(layer, 0), num_layers - 1) for layer in (2, num_layers // 2, num_layers - 3))


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    target_hidden_size: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    aux_layer_ids: tuple[int, ...]
    fc_norm: bool = False  # EAGLE 3.1
    norm_output: bool = False  # EAGLE 3.1
    extra: dict = field(default_factory=dict)  # training facts (steps, data) kept in config.json

    def to_hf(self) -> dict:
        """config.json as vLLM / SGLang read an EAGLE-3 head."""
        return {
            "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "num_hidden_layers": 1, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu", "tie_word_embeddings": False, "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size, "target_hidden_size": self.target_hidden_size,
            "eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids), "fc_norm": self.fc_norm,
            "norm_output": self.norm_output,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids),
                             "use_aux_hidden_state": True},
            "tierserve": self.extra,
        }

    @classmethod
    def from_hf(cls, hf: dict) -> "Eagle3Config":
        eagle = hf.get("eagle_config") or {}
        if hf.get("norm_before_fc") or eagle.get("norm_before_fc") or hf.get("norm_before_residual"):
            raise ValueError("EAGLE-3 head options norm_before_fc / norm_before_residual are not supported")
        if eagle.get("use_aux_hidden_state") is False:
            raise ValueError("EAGLE-3 head without aux hidden states (use_aux_hidden_state: false) is not supported")
        layer_ids = hf.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
        num_heads = int(hf["num_attention_heads"])
        return cls(
            hidden_size=int(hf["hidden_size"]), intermediate_size=int(hf["intermediate_size"]),
            num_heads=num_heads, num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(hf.get("rope_theta", 10000.0)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            target_hidden_size=int(hf.get("target_hidden_size") or hf["hidden_size"]),
            vocab_size=int(hf["vocab_size"]), draft_vocab_size=int(hf.get("draft_vocab_size") or hf["vocab_size"]),
            aux_layer_ids=tuple(int(i) for i in layer_ids or ()),
            fc_norm=bool(hf.get("fc_norm", False)), norm_output=bool(hf.get("norm_output", False)),
            extra=dict(hf.get("tierserve") or {}))


class Eagle3Head(nn.Module):
    def __init__(self, config: Eagle3Config, embed_tokens: torch.Tensor):
        """embed_tokens [V, E]: the target's embedding (shared, never trained)."""
        super().__init__()
        self.config = config
        hidden, head_dim = config.hidden_size, config.head_dim
        self.embed_weight = embed_tokens.detach()  # a plain tensor (not a parameter): never saved or trained
        self.fc = nn.Linear(len(config.aux_layer_ids) * config.target_hidden_size, hidden, bias=False)
        self.fc_norm = nn.ModuleList(nn.RMSNorm(config.target_hidden_size, eps=config.rms_norm_eps)
                                     for _ in config.aux_layer_ids) if config.fc_norm else None
        self.input_layernorm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.hidden_norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(2 * hidden, config.num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden, config.num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * hidden, config.num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * head_dim, hidden, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.gate_proj = nn.Linear(hidden, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, hidden, bias=False)
        self.norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scale = head_dim ** -0.5

    # ---- pieces ------------------------------------------------------------------------------------------------
    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """aux [..., C*Et] (the target's captured states) -> [..., E]."""
        if self.fc_norm is not None:
            chunks = aux.split(self.config.target_hidden_size, dim=-1)
            aux = torch.cat([norm(chunk) for norm, chunk in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(aux)

    def qkv(self, token_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """token_ids [N], hidden [N, E] (fused features or fed-back states), positions [N] -> q [N, H, D],
        k/v [N, Hkv, D] (q and k rotated)."""
        config = self.config
        embeds = self.input_layernorm(F.embedding(token_ids, self.embed_weight))
        layer_input = torch.cat([embeds, self.hidden_norm(hidden)], dim=-1)  # [N, 2E]
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [N, F]
        cos, sin = freqs.cos(), freqs.sin()
        query = reference_rope(self.q_proj(layer_input).view(-1, config.num_heads, config.head_dim), cos, sin)
        key = reference_rope(self.k_proj(layer_input).view(-1, config.num_kv_heads, config.head_dim), cos, sin)
        value = self.v_proj(layer_input).view(-1, config.num_kv_heads, config.head_dim)
        return query, key, value

    def finish(self, hidden: torch.Tensor, attention_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [N, E] (the layer's residual input), attention_out [N, H*D] -> (fed-back state [N, E],
        draft logits [N, Vd])."""
        residual = hidden + self.o_proj(attention_out)
        mlp_in = self.post_attention_layernorm(residual)
        prenorm = residual + self.down_proj(F.silu(self.gate_proj(mlp_in)) * self.up_proj(mlp_in))
        normed = self.norm(prenorm)
        return (normed if self.config.norm_output else prenorm), self.lm_head(normed)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    # ---- checkpoint --------------------------------------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The head's tensors under the names vLLM / SGLang load."""
        return {_checkpoint_name(name): tensor.detach().contiguous() for name, tensor in self.state_dict().items()}

    def save(self, directory: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, WEIGHTS_FILE + ".tmp")
        save_file(self.checkpoint_tensors(), temporary)
        os.replace(temporary, os.path.join(directory, WEIGHTS_FILE))
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(self.config.to_hf(), f, indent=2)

    @classmethod
    def load(cls, directory: str, embed_tokens: torch.Tensor) -> "Eagle3Head":
        from safetensors.torch import load_file

        config_path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no EAGLE-3 head at {directory} (missing {CONFIG_FILE})")
        with open(config_path) as f:
            config = Eagle3Config.from_hf(json.load(f))
        head = cls(config, embed_tokens)
        tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
        ours = {}
        for name in head.state_dict():
            checkpoint_name = _checkpoint_name(name)
            if checkpoint_name not in tensors:
                raise ValueError(f"EAGLE-3 head at {directory} lacks tensor {checkpoint_name!r}")
            ours[name] = tensors[checkpoint_name]
        head.load_state_dict(ours)
        return head.eval().requires_grad_(False)


# Our module -> its name in the checkpoint (the decoder layer is `midlayer`, as vLLM and SGLang name it).
_CHECKPOINT_MODULES = {
    "input_layernorm": "midlayer.input_layernorm", "hidden_norm": "midlayer.hidden_norm",
    "q_proj": "midlayer.self_attn.q_proj", "k_proj": "midlayer.self_attn.k_proj",
    "v_proj": "midlayer.self_attn.v_proj", "o_proj": "midlayer.self_attn.o_proj",
    "post_attention_layernorm": "midlayer.post_attention_layernorm", "gate_proj": "midlayer.mlp.gate_proj",
    "up_proj": "midlayer.mlp.up_proj", "down_proj": "midlayer.mlp.down_proj"}


def _checkpoint_name(name: str) -> str:
    module, dot, leaf = name.partition(".")
    return f"{_CHECKPOINT_MODULES.get(module, module)}{dot}{leaf}"


def head_config_for(target_config, draft_vocab_size: int, fc_norm: bool = True, norm_output: bool = False,
                    aux_layer_ids: tuple[int, ...] | None = None) -> Eagle3Config:
    """A head shaped like one of the target's layers (its heads, head dim, MLP width and RoPE)."""
    return Eagle3Config(
        hidden_size=target_config.hidden_size, intermediate_size=target_config.intermediate_size,
        num_heads=target_config.num_heads, num_kv_heads=target_config.num_kv_heads,
        head_dim=target_config.head_dim, rms_norm_eps=target_config.rms_norm_eps,
        rope_theta=target_config.rope_theta, max_position_embeddings=target_config.max_position_embeddings,
        target_hidden_size=target_config.hidden_size, vocab_size=target_config.vocab_size,
        draft_vocab_size=draft_vocab_size,
        aux_layer_ids=aux_layer_ids or default_aux_layer_ids(target_config.num_layers),
        fc_norm=fc_norm, norm_output=norm_output)


def default_head_dir(model_path: str) -> str:
    """Where `tierserve train-drafter eagle3` caches a head for this target (by the model file's name)."""
    cache = os.environ.get("TIERSERVE_DRAFTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                      "tierserve", "drafters")
    return os.path.join(cache, os.path.basename(os.path.normpath(model_path)) + ".eagle3")


def head_layer_ids(loaded, head_dir: str | None) -> tuple[int, ...]:
    """The target layers a head reads, from its config alone (a prefill tier captures them, never loads the head)."""
    directory = head_dir or default_head_dir(loaded.path)
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no EAGLE-3 head at {directory}: train one with `tierserve train-drafter eagle3 "
                                f"--model {loaded.path}` (or give speculative.eagle_head)")
    with open(path) as f:
        layer_ids = Eagle3Config.from_hf(json.load(f)).aux_layer_ids
    return layer_ids or default_aux_layer_ids(loaded.config.num_layers)


def load_head_for(loaded, head_dir: str | None) -> Eagle3Head:
    """The EAGLE-3 head for this loaded target: from head_dir, or the cached one; checked against the target."""
    directory = head_dir or default_head_dir(loaded.path)
    if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        raise FileNotFoundError(f"no EAGLE-3 head at {directory}: train one with `tierserve train-drafter eagle3 "
                                f"--model {loaded.path}` (or give speculative.eagle_head)")
    head = Eagle3Head.load(directory, loaded.model.embed_tokens.weight)
    target = loaded.config
    if head.config.vocab_size != target.vocab_size or head.config.target_hidden_size != target.hidden_size:
        raise ValueError(f"EAGLE-3 head at {directory} was made for a {head.config.vocab_size}-token, "
                         f"{head.config.target_hidden_size}-wide target; this one is {target.vocab_size}, "
                         f"{target.hidden_size}")
    if not head.config.aux_layer_ids:
        head.config = dataclasses.replace(head.config, aux_layer_ids=default_aux_layer_ids(target.num_layers))
    if max(head.config.aux_layer_ids) >= target.num_layers:
        raise ValueError(f"EAGLE-3 head at {directory} reads layer {max(head.config.aux_layer_ids)}; the target "
                         f"has {target.num_layers}")
    return head.to(loaded.model.dtype)
