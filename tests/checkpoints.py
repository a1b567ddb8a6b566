"""Tiny random checkpoints made on the fly (HF safetensors and GGUF) for fast, exact model tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# A small byte-level BPE vocabulary: all 256 byte symbols + a few merges + chat specials.
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_level_vocab() -> tuple[dict[str, int], list[str]]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    return vocab, [f"{left} {right}" for left, right in merges]


def write_tiny_tokenizer(directory: Path) -> int:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = _byte_level_vocab()
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIALS])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE,
        "add_bos_token": False,
    }))
    return len(vocab)


def make_tiny_hf_checkpoint(directory: Path, variant: str = "llama", seed: int = 0) -> Path:
    """variant: llama (tied), llama-untied, qwen2 (q/k/v bias), llama3-rope, linear-rope, unsupported; MoE: mixtral
    (every layer sparse), qwen2_moe (shared expert with its gate, layer 1 dense, top-k not renormalised), qwen3_moe
    (q/k norm, fine-grained experts, renormalised top-k)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer(directory)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    if variant == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=10000.0))
    elif variant == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                                 sliding_window=None))
    elif variant == "qwen2_moe":
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**common, num_experts=6, num_experts_per_tok=2,
                                                   moe_intermediate_size=32, shared_expert_intermediate_size=96,
                                                   mlp_only_layers=[1], norm_topk_prob=False))
    elif variant == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, head_dim=16, num_experts=8, num_experts_per_tok=3,
                                                   moe_intermediate_size=24, norm_topk_prob=True))
    else:
        extra: dict = {"rope_theta": 10000.0}
        if variant == "llama-untied":
            common["tie_word_embeddings"] = False
        elif variant == "llama3-rope":
            extra["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        elif variant == "linear-rope":
            extra["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
        model = LlamaForCausalLM(LlamaConfig(**common, **extra))
    # Random init is near-uniform; widen it so logits are peaked and greedy choices are not ties.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15 if param.dim() == 2 else 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    if variant == "unsupported":
        config = json.loads((directory / "config.json").read_text())
        config["architectures"] = ["GPT2LMHeadModel"]
        config["model_type"] = "gpt2"
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def write_tiny_gguf(path: Path, hf_dir: Path, quant: str = "F32") -> Path:
    """Convert a tiny HF Llama checkpoint to GGUF the way llama.cpp does (Q/K rows permuted for its RoPE)."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    from safetensors.torch import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    weights = load_file(str(hf_dir / "model.safetensors"))
    num_heads, num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    vocab = tokenizer["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in _SPECIALS else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    qtype = GGMLQuantizationType[quant]

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:  # llama.cpp convert_hf_to_gguf.LlamaModel.permute
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                   "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                   "self_attn.o_proj.weight": "attn_output.weight",
                   "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                   "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for hf_name, tensor in weights.items():
        if hf_name in names:
            gguf_name = names[hf_name]
        else:
            _, _, index, rest = hf_name.split(".", 3)
            gguf_name = f"blk.{index}.{layer_names[rest]}"
        if hf_name.endswith("q_proj.weight"):
            tensor = permute(tensor, num_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = permute(tensor, num_kv_heads)
        array = tensor.float().numpy()
        if array.ndim == 2 and qtype != GGMLQuantizationType.F32:
            data = quantize(array, qtype) if qtype != GGMLQuantizationType.F16 else array.astype(np.float16)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
