"""Our decoder vs transformers on tiny random checkpoints made on the fly: logits equal to fp32 tolerance."""

import pytest
import torch

from tests.checkpoints import make_tiny_hf_checkpoint, write_tiny_gguf
from workers.attention import AttentionMetadata, PrefillChunk
from workers.kv.presets import make_codec
from workers.model.config import UnsupportedModelError
from workers.model.loader import load_model

FP32_ATOL = 1e-4


def prefill_logits(loaded, token_ids: list[int], chunk_size: int | None = None) -> torch.Tensor:
    """The prompt through the paged path, whole or in chunks of chunk_size tokens; logits for every position."""
    config = loaded.config
    block_size = 16
    num_tokens = len(token_ids)
    chunk_size = chunk_size or num_tokens
    num_blocks = -(-num_tokens // block_size)
    codec = make_codec("auto", model_dtype=torch.float32, num_layers=config.num_layers,
                       num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
    pages = [codec.allocate(layer, num_blocks, block_size, torch.device("cpu")) for layer in range(config.num_layers)]
    logits = []
    with torch.inference_mode():
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            meta = AttentionMetadata(
                slot_mapping=torch.arange(start, end), num_decode_tokens=0, decode_block_tables=None,
                decode_seq_lens=None,
                prefills=(PrefillChunk(0, end - start, start, torch.arange(-(-end // block_size))),))
            hidden = loaded.model(torch.tensor(token_ids[start:end]), torch.arange(start, end), pages, codec, meta)
            logits.append(loaded.model.compute_logits(hidden))
    return torch.cat(logits)


def hf_logits(model_dir, token_ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


@pytest.mark.parametrize("variant", ["llama", "llama-untied", "qwen2", "llama3-rope", "linear-rope"])
def test_hf_checkpoint_logits_match_transformers(tmp_path, variant):
    model_dir = make_tiny_hf_checkpoint(tmp_path / variant, variant)
    loaded = load_model(str(model_dir), dtype=torch.float32)
    if variant == "qwen2":
        assert loaded.config.qkv_bias
    assert loaded.config.tie_word_embeddings == (variant != "llama-untied")
    generator = torch.Generator().manual_seed(1)
    # Long enough that llama3/linear scaling matters (positions past original_max_position_embeddings=64).
    token_ids = torch.randint(3, loaded.config.vocab_size, (200,), generator=generator).tolist()
    ours = prefill_logits(loaded, token_ids)
    theirs = hf_logits(model_dir, token_ids)
    assert (ours - theirs).abs().max().item() < FP32_ATOL


@pytest.mark.parametrize("quant", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_gguf_loader_unpermutes_and_dequantizes(tmp_path, quant):
    """A tiny GGUF written like llama.cpp's converter (Q/K rows permuted) must load back to HF-equal logits.

    The oracle is transformers on the HF weights round-tripped through the same quantizer. Quant blocks
    run along each row, and the Q/K permutation moves whole rows, so the round trip commutes with it:
    the comparison stays exact to fp32 tolerance for every quant type.
    """
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    from safetensors.torch import load_file, save_file

    model_dir = make_tiny_hf_checkpoint(tmp_path / "hf", "llama-untied")
    gguf_path = write_tiny_gguf(tmp_path / f"tiny-{quant}.gguf", model_dir, quant)
    loaded = load_model(str(gguf_path), dtype=torch.float32)
    assert loaded.tokenizer.chat_template is not None

    qtype = GGMLQuantizationType[quant]
    weights = load_file(str(model_dir / "model.safetensors"))
    for name, weight in weights.items():
        if weight.dim() == 2 and quant != "F32":
            array = weight.float().numpy()
            packed = array.astype(np.float16) if quant == "F16" else quantize(array, qtype)
            weights[name] = torch.from_numpy(np.asarray(dequantize(packed, qtype), dtype=np.float32).copy()
                                             ).reshape(weight.shape)
    save_file(weights, str(model_dir / "model.safetensors"))
    token_ids = torch.randint(3, loaded.config.vocab_size, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    ours = prefill_logits(loaded, token_ids)
    theirs = hf_logits(model_dir, token_ids)
    assert (ours - theirs).abs().max().item() < FP32_ATOL


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    model_dir = make_tiny_hf_checkpoint(tmp_path / "gpt2", "unsupported")
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(str(model_dir))


def test_missing_and_corrupt_model_files(tmp_path):
    from workers.model.gguf_loader import CorruptModelError

    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(CorruptModelError, match="not a valid GGUF"):
        load_model(str(junk))


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_checkpoint_logits_match_transformers(tmp_path, variant):
    """Routed experts through the one decoder class: logits equal transformers' (prefilled whole and in chunks)."""
    model_dir = make_tiny_hf_checkpoint(tmp_path / variant, variant)
    loaded = load_model(str(model_dir), dtype=torch.float32)
    moe = loaded.config.moe
    assert moe is not None
    assert moe.sparse_layers == ((0,) if variant == "qwen2_moe" else (0, 1))
    assert loaded.config.qk_norm == (variant == "qwen3_moe")
    assert (moe.shared_intermediate_size > 0) == (variant == "qwen2_moe")
    generator = torch.Generator().manual_seed(2)
    token_ids = torch.randint(3, loaded.config.vocab_size, (60,), generator=generator).tolist()
    theirs = hf_logits(model_dir, token_ids)
    assert (prefill_logits(loaded, token_ids) - theirs).abs().max().item() < FP32_ATOL
    assert (prefill_logits(loaded, token_ids, chunk_size=7) - theirs).abs().max().item() < FP32_ATOL
    # every expert of the first sparse layer is used by some token: the test sees all of them
    layer = loaded.model.layers[moe.sparse_layers[0]].mlp
    with torch.no_grad():
        _, expert_ids = layer.route(loaded.model.embed_tokens(torch.tensor(token_ids)))
    assert len(set(expert_ids.flatten().tolist())) == moe.num_experts
