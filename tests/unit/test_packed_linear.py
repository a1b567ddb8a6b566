"""MKL-packed linears (the batched-decode fast path) against torch's plain F.linear, on fresh random inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.model.packed_linear import MklPackedLinear, mkl_packing_available, pack_linears

pytestmark = pytest.mark.skipif(not mkl_packing_available(), reason="this torch build has no MKL")


def linear(in_features: int, out_features: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    module = nn.Linear(in_features, out_features, bias=bias)
    module.requires_grad_(False)
    return module


@pytest.mark.parametrize("num_rows", [1, 5, 8, 13, 31, 32, 33, 47, 64, 65, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_equals_plain_for_every_row_count(num_rows, bias):
    plain = linear(96, 200, bias, seed=num_rows)
    packed = MklPackedLinear(plain)
    x = torch.randn(num_rows, 96)
    torch.testing.assert_close(packed(x), F.linear(x, plain.weight, plain.bias), rtol=1e-5, atol=1e-5)


def test_at_exactly_the_packed_row_count_it_is_bit_identical():
    plain = linear(576, 960, True, seed=0)
    x = torch.randn(32, 576)
    assert torch.equal(MklPackedLinear(plain, rows=32)(x), F.linear(x, plain.weight, plain.bias))


def test_padding_never_changes_a_rows_result():
    """Batch invariance inside the packed path: a row's output doesn't depend on the other rows."""
    packed = MklPackedLinear(linear(128, 256, False, seed=1))
    x = torch.randn(32, 128)
    full = packed(x)
    for num_rows in (8, 17, 31):
        assert torch.equal(packed(x[:num_rows]), full[:num_rows])


def test_leading_dimensions_are_kept():
    plain = linear(64, 48, True, seed=2)
    x = torch.randn(2, 10, 64)
    out = MklPackedLinear(plain)(x)
    assert out.shape == (2, 10, 48)
    torch.testing.assert_close(out, F.linear(x, plain.weight, plain.bias), rtol=1e-5, atol=1e-5)


def test_pack_linears_in_place_keeps_tied_weights_and_is_idempotent(tiny_llama_dir):
    from workers.model.loader import load_model

    model = load_model(str(tiny_llama_dir)).model
    tied = model.config.tie_word_embeddings
    hidden = torch.randn(20, model.config.hidden_size)
    before = model.compute_logits(hidden)
    count = pack_linears(model)
    assert count == 4 * model.config.num_layers + 1
    assert pack_linears(model) == 0
    assert isinstance(model.lm_head, MklPackedLinear)
    if tied:
        assert model.lm_head.weight is model.embed_tokens.weight
    torch.testing.assert_close(model.compute_logits(hidden), before, rtol=1e-5, atol=1e-5)


def test_non_float32_weights_are_refused():
    with pytest.raises(ValueError, match="float32"):
        MklPackedLinear(linear(8, 8, False, seed=3).to(torch.bfloat16))


def test_engine_with_packed_weights_decodes_like_plain(tiny_llama_dir):
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.model.loader import load_model
    from workers.sampling_params import SamplingParams

    def run(pack: bool) -> dict[str, list[int]]:
        loaded = load_model(str(tiny_llama_dir))
        engine = Engine(EngineConfig(num_kv_blocks=128, pack_cpu_weights=pack), loaded=loaded)
        assert isinstance(engine.model.lm_head, MklPackedLinear) == pack
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        for index in range(12):  # a 12-row decode batch: the packed path, padded
            engine.add_request(f"r{index}", prompt_token_ids=[5 + index, 40, 41, 42 + index], params=params)
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for output in engine.step():
                tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        return tokens

    assert run(pack=True) == run(pack=False)


def test_a_packed_model_survives_deepcopy_and_pickle():
    import copy
    import pickle

    packed = MklPackedLinear(linear(64, 80, True, seed=4))
    x = torch.randn(16, 64)
    for clone in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert clone.weight is not packed.weight
        assert torch.equal(clone(x), packed(x))
