"""KV codecs: codebooks, error bounds, byte accounting, fused attention == attention over decoded KV, names."""

import math

import pytest
import torch

from workers.kv.calibration import KVCalibration, allocate_bits, calibrate
from workers.kv.codebooks import gaussian_mse, lloyd_max_gaussian
from workers.kv.presets import make_codec, outlier_bits

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 3, 2, 64, 8
GROUP = 3  # query heads per KV head


def codec_for(name: str, calibration: KVCalibration | None = None, exclude_layers=()):
    return make_codec(name, model_dtype=torch.float32, num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS,
                      head_dim=HEAD_DIM, calibration=calibration, exclude_layers=exclude_layers)


def synthetic_calibration(seed: int = 0) -> KVCalibration:
    """Channel statistics shaped like real keys: a few large DC/outlier channels, most small."""
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM)
    sigma = torch.rand(shape, generator=gen) + 0.1
    sigma[..., :4] *= 8
    return KVCalibration(key_center=torch.randn(shape, generator=gen), key_sigma=sigma,
                         key_score=sigma.square() * (torch.rand(shape, generator=gen) + 0.1),
                         value_center=torch.randn(shape, generator=gen) * 0.1, value_sigma=sigma.flip(-1),
                         value_score=sigma.flip(-1).square(), num_tokens=100)


def round_trip(codec, layer: int, key: torch.Tensor, value: torch.Tensor):
    num_tokens = key.shape[0]
    num_blocks = -(-num_tokens // BLOCK_SIZE)
    pages = codec.allocate(layer, num_blocks, BLOCK_SIZE, torch.device("cpu"))
    codec.write(pages, torch.arange(num_tokens), key, value)
    decoded_key, decoded_value = codec.gather(pages, torch.arange(num_blocks))
    return pages, decoded_key[:num_tokens], decoded_value[:num_tokens]


def test_lloyd_max_codebooks_match_the_known_gaussian_distortions():
    # Published MSEs of the Lloyd-Max quantizer for N(0, 1) (Max 1960): 1..4 bits.
    for bits, known in zip(range(1, 5), (0.3634, 0.1175, 0.03455, 0.009497)):
        assert gaussian_mse(bits) == pytest.approx(known, rel=2e-3)
        levels = lloyd_max_gaussian(bits)
        assert torch.allclose(levels, -levels.flip(0), atol=1e-9)  # symmetric
    # Each extra bit cuts the error by ~4x at high rate (the 4^-b law the allocator relies on).
    assert 3.5 < gaussian_mse(6) / gaussian_mse(7) < 4.5


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_turboquant_error_is_within_the_lloyd_max_bound(bits):
    """Rotated Gaussian-ish data: relative MSE ~ mse(b); heavy-tailed (outlier channel) data too, thanks to rotation."""
    codec = codec_for(f"tq-k{bits}v{bits}")
    gen = torch.Generator().manual_seed(bits)
    key = torch.randn(512, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    key[..., 5] *= 20  # an outlier channel: rotation spreads it before quantization
    value = torch.randn(512, NUM_KV_HEADS, HEAD_DIM, generator=gen) * 3
    _, decoded_key, decoded_value = round_trip(codec, 1, key, value)
    for original, decoded in ((key, decoded_key), (value, decoded_value)):
        relative = ((decoded - original).square().sum(-1) / original.square().sum(-1)).mean()
        assert relative < 1.25 * gaussian_mse(bits), (bits, float(relative))
        # Norm correction: every decoded vector keeps its norm (to fp16 scale precision).
        assert torch.allclose(decoded.norm(dim=-1), original.norm(dim=-1), rtol=2e-3)


def test_qjl_residual_removes_the_mse_codes_bias_on_aligned_queries():
    """A key read by its own direction (the query attention cares most about): MSE codes underestimate q.k
    (Lloyd-Max cells shrink, the norm-corrected vector points elsewhere); + QJL is unbiased, MSE part unchanged."""
    gen = torch.Generator().manual_seed(3)
    key = torch.randn(4096, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    value = torch.randn(4096, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    mse_pages, mse_key, _ = round_trip(codec_for("tq-k2v2"), 1, key, value)
    qjl_pages, qjl_key, _ = round_trip(codec_for("tq-k2v2+qjl"), 1, key, value)
    assert torch.equal(mse_pages["key_codes"], qjl_pages["key_codes"])
    exact = key.square().sum(-1)  # q = k
    for decoded, biased in ((mse_key, True), (qjl_key, False)):
        relative = (key * decoded).sum(-1) / exact - 1  # [T, Hkv]
        standard_error = relative.std() / math.sqrt(relative.numel())
        assert (relative.mean().abs() > 10 * standard_error) == biased, (biased, float(relative.mean()))


def test_outlier_channels_get_one_more_bit_where_the_calibrated_rms_is_largest():
    rms = torch.rand(NUM_KV_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    bits = outlier_bits(rms, 3.25)
    for head in range(NUM_KV_HEADS):
        outliers = set(rms[head].topk(16).indices.tolist())  # round(0.25 * 64)
        assert {c for c in range(HEAD_DIM) if bits[head, c] == 4} == outliers
        assert all(bits[head, c] == 3 for c in range(HEAD_DIM) if c not in outliers)
    assert torch.equal(outlier_bits(rms, 3.0), torch.full((NUM_KV_HEADS, HEAD_DIM), 3, dtype=torch.int32))
    calibration = synthetic_calibration(4)
    codec = codec_for("tq-k3.25v2.5", calibration)
    for key_plan, value_plan in codec.plans:  # each set is its own width group: 2 scales per token and head
        assert key_plan.layout.num_groups == value_plan.layout.num_groups == 2
        assert (key_plan.layout.bits == 4).sum(1).tolist() == [16] * NUM_KV_HEADS
        assert (value_plan.layout.bits == 3).sum(1).tolist() == [32] * NUM_KV_HEADS
    # On data whose large channels are the calibrated ones, outlier bits beat spending nothing extra.
    gen = torch.Generator().manual_seed(5)
    key = calibration.key_center[1] + torch.randn(2048, NUM_KV_HEADS, HEAD_DIM, generator=gen) * calibration.key_sigma[1]
    value = torch.randn(2048, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    errors = {}
    for name in ("tq-k3v3", "tq-k3.25v3"):
        _, decoded_key, _ = round_trip(codec_for(name, calibration), 1, key, value)
        errors[name] = float((decoded_key - key).square().sum() / key.square().sum())
    assert errors["tq-k3.25v3"] < 0.9 * errors["tq-k3v3"], errors


def test_int8_error_is_within_half_a_step_per_element():
    codec = codec_for("int8")
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(64, NUM_KV_HEADS, HEAD_DIM, generator=gen) * 5
    value = torch.randn(64, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    _, decoded_key, decoded_value = round_trip(codec, 0, key, value)
    for original, decoded in ((key, decoded_key), (value, decoded_value)):
        step = original.abs().amax(-1, keepdim=True) / 127
        # Half a step of rounding, plus the fp16 scale's relative error (2^-11) times the largest code.
        assert ((decoded - original).abs() <= step * (0.5 + 127 * 2**-11) + 1e-6).all()
        assert not ((decoded - original).abs() <= step * 0.3).all()  # the bound is not vacuous


def test_block_gtq_spends_bits_where_scores_are_and_beats_uniform_on_weighted_error():
    calibration = synthetic_calibration()
    gtq, tq = codec_for("gtq-3.0", calibration), codec_for("tq-k3v3")
    gen = torch.Generator().manual_seed(1)
    layer = 2
    sigma, center = calibration.key_sigma[layer], calibration.key_center[layer]
    key = center + sigma * torch.randn(400, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    value = calibration.value_center[layer] + calibration.value_sigma[layer] * torch.randn(
        400, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    weight = calibration.key_score[layer] / sigma.square()  # E[q_i^2]: what a key error costs per channel
    errors = {}
    for name, codec in (("gtq", gtq), ("tq", tq)):
        _, decoded_key, _ = round_trip(codec, layer, key, value)
        errors[name] = float(((decoded_key - key).square() * weight).sum(-1).mean())
    assert errors["gtq"] < 0.5 * errors["tq"], errors
    # Same code budget (3 bits per channel for K and V); gtq pays one fp16 scale per width group.
    assert tq.bytes_per_token(layer) == 2 * NUM_KV_HEADS * (3 * HEAD_DIM // 8 + 2)
    key_plan, value_plan = gtq.plans[layer]
    assert gtq.bytes_per_token(layer) == sum(
        NUM_KV_HEADS * (3 * HEAD_DIM // 8 + 2 * plan.layout.num_groups) for plan in (key_plan, value_plan))
    assert key_plan.layout.num_groups > 1


def test_allocate_bits_spends_the_exact_budget_by_score_and_pairs_rope_channels():
    score = torch.rand(2, HEAD_DIM, generator=torch.Generator().manual_seed(0)) + 0.01
    score[0, 3] = 1000.0  # an outlier channel
    bits = allocate_bits(score, 3.0, rope_pairs=True)
    assert (bits.sum(1) == 3 * HEAD_DIM).all()
    assert ((bits >= 1) & (bits <= 8)).all()
    half = HEAD_DIM // 2
    assert torch.equal(bits[:, :half], bits[:, half:])  # a RoPE pair shares its width
    assert bits[0, 3] == bits[0].max() and bits[0, 3] >= 6
    per_channel = allocate_bits(score, 2.5, rope_pairs=False)
    assert (per_channel.sum(1) == round(2.5 * HEAD_DIM)).all()
    order = torch.argsort(score[1])  # more score never means fewer bits
    assert (per_channel[1, order].diff() >= 0).all()


@pytest.mark.parametrize("name", ["float16", "bfloat16", "int8", "tq-k4v3", "tq-k2v2", "tq-k3v4+qjl", "tq-k3.5v2.25",
                                  "gtq-3.5", "gtq-k4v2.5"])
def test_byte_accounting_equals_allocated_storage(name):
    codec = codec_for(name, synthetic_calibration(), exclude_layers=(0,) if name.startswith("tq") else ())
    for layer in range(NUM_LAYERS):
        pages = codec.allocate(layer, 5, BLOCK_SIZE, torch.device("cpu"))
        assert pages.nbytes() == 5 * BLOCK_SIZE * codec.bytes_per_token(layer)
    if name.startswith("tq"):  # the excluded layer is fp16
        assert codec.bytes_per_token(0) == 2 * NUM_KV_HEADS * HEAD_DIM * 2 > codec.bytes_per_token(1)


@pytest.mark.parametrize("name", ["int8", "tq-k4v3", "tq-k3v2", "tq-k2v3+qjl", "tq-k3.5v3", "gtq-3.0"])
def test_fused_decode_attention_equals_attention_over_decoded_kv(name):
    """Queries moved into the keys' space + one inverse map on the output == decode-then-attend (exactly)."""
    codec = codec_for(name, synthetic_calibration(2))
    gen = torch.Generator().manual_seed(7)
    layer, num_blocks = 1, 12
    pages = codec.allocate(layer, num_blocks, BLOCK_SIZE, torch.device("cpu"))
    slots = torch.arange(num_blocks * BLOCK_SIZE)
    codec.write(pages, slots, torch.randn(slots.numel(), NUM_KV_HEADS, HEAD_DIM, generator=gen) * 2 + 1,
                torch.randn(slots.numel(), NUM_KV_HEADS, HEAD_DIM, generator=gen))
    seq_lens = torch.tensor([1, 37, 96], dtype=torch.int32)
    block_tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:num_blocks].to(torch.int32)
                                for _ in range(3)])
    query = torch.randn(3, NUM_KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    scale = HEAD_DIM ** -0.5
    out = codec.decode_attention(query, pages, block_tables, seq_lens, scale)
    for b in range(3):
        key, value = codec.gather(pages, block_tables[b].long())
        key, value = key[:seq_lens[b]], value[:seq_lens[b]]
        q = query[b].view(NUM_KV_HEADS, GROUP, HEAD_DIM)
        probs = torch.softmax(torch.einsum("hgd,lhd->hgl", q, key) * scale, dim=-1)
        expected = torch.einsum("hgl,lhd->hgd", probs, value).reshape(-1, HEAD_DIM)
        assert torch.allclose(out[b], expected, atol=2e-4, rtol=1e-4), (name, b)


def test_codec_names_and_clear_errors():
    calibration = synthetic_calibration()
    assert codec_for("tq-k4v3").name == "tq-k4v3"
    assert codec_for("tq-k4v3", exclude_layers=(2, 0)).name == "tq-k4v3+fp16:0,2"
    gtq = codec_for("gtq-3.0", calibration)
    assert gtq.name == f"gtq-3.0@{calibration.digest()}.v2"  # .v2: the page format version
    # A different calibration is a different byte format, so a different name (tiers compare names).
    assert codec_for("gtq-3.0", synthetic_calibration(seed=1)).name != gtq.name
    with pytest.raises(ValueError, match="unknown kv codec 'tq-k9v3'"):
        codec_for("tq-k9v3")
    with pytest.raises(ValueError, match="needs a calibration file"):
        codec_for("gtq-3.0")
    with pytest.raises(ValueError, match="outlier channels.*needs a calibration"):
        codec_for("tq-k3.5v3")
    assert codec_for("tq-k3.5v3", calibration).name == f"tq-k3.5v3@{calibration.digest()}"
    assert codec_for("tq-k3v4+qjl").name == "tq-k3v4+qjl"  # uncalibrated: the seeded projection is in the name
    with pytest.raises(ValueError, match="layer 7 is outside"):
        codec_for("tq-k4v4", exclude_layers=(7,))
    with pytest.raises(ValueError, match="key bits must be within"):
        codec_for("gtq-k9v3", calibration)
    with pytest.raises(ValueError, match="calibration is for shape"):
        make_codec("gtq-3.0", model_dtype=torch.float32, num_layers=NUM_LAYERS + 1, num_kv_heads=NUM_KV_HEADS,
                   head_dim=HEAD_DIM, calibration=calibration)


def test_calibration_on_a_model_round_trips_through_a_file(tiny_loaded, tmp_path):
    model = tiny_loaded.model
    config = model.config
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, config.vocab_size, (40,), generator=gen).tolist() for _ in range(2)]
    calibration = calibrate(model, windows)
    shape = (config.num_layers, config.num_kv_heads, config.head_dim)
    assert calibration.num_tokens == 80 and tuple(calibration.key_center.shape) == shape
    assert (calibration.key_sigma > 0).all() and (calibration.value_score > 0).all()
    path = tmp_path / "calibration.pt"
    calibration.save(str(path))
    loaded = KVCalibration.load(str(path))
    assert loaded.digest() == calibration.digest()
    assert torch.equal(loaded.key_score, calibration.key_score)
    # Cross-check one statistic against a direct computation from the model's own projections.
    ids = torch.tensor(windows[0] + windows[1])
    positions = torch.tensor(list(range(40)) * 2)
    layer = model.layers[0]
    _, key, _ = layer.self_attn.project(layer.input_layernorm(model.embed_tokens(ids)), model.rope.lookup(positions))
    assert torch.allclose(calibration.key_center[0], key.mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="does not exist"):
        KVCalibration.load(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a calibration")
    with pytest.raises(ValueError, match="not readable|not a tierserve"):
        KVCalibration.load(str(tmp_path / "junk.pt"))


def test_lossy_codec_makes_every_query_read_the_decoded_cache(tiny_loaded):
    """Chunked and one-shot prefill see the same (decoded) keys, so their logits agree; fp32 identity is exact."""
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, tiny_loaded.config.vocab_size, (45,), generator=gen).tolist()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    runs = {}
    for budget in (8, 64):
        engine = Engine(EngineConfig(kv_codec="tq-k4v4", num_kv_blocks=32, max_num_batched_tokens=budget,
                                     enable_prefix_caching=False), loaded=tiny_loaded)
        [completion] = engine.generate([prompt], params)
        runs[budget] = completion
        assert engine.kv_stats().num_used_blocks == 0
    assert runs[8].token_ids == runs[64].token_ids
    first_8 = runs[8].logprobs[0]
    first_64 = runs[64].logprobs[0]
    assert math.isclose(first_8.logprob, first_64.logprob, abs_tol=1e-3)


def test_engine_config_rejects_bad_codec_settings_at_load_time():
    """Config validation names the problem before any replica starts (no crash-looping deployment)."""
    from pydantic import ValidationError

    from workers.config import EngineConfig

    assert EngineConfig(kv_codec="tq-k4v3").kv_codec == "tq-k4v3"
    assert EngineConfig(kv_codec="gtq-3.0", kv_calibration="calib.pt").kv_codec == "gtq-3.0"
    with pytest.raises(ValidationError, match="unknown kv codec 'tq4'"):
        EngineConfig(kv_codec="tq4")
    with pytest.raises(ValidationError, match="bits must be within 1..8"):
        EngineConfig(kv_codec="gtq-9.5", kv_calibration="calib.pt")
    with pytest.raises(ValidationError, match="needs kv_calibration"):
        EngineConfig(kv_codec="gtq-3.0")


@pytest.mark.parametrize("head_dim", [HEAD_DIM, 20])  # 20: rows of 40, past the last full vector (fp16 tails)
@pytest.mark.parametrize("page_dtype", ["float32", "float16", "bfloat16"])
def test_identity_write_native_equals_its_index_copy_twin(monkeypatch, page_dtype, head_dim):
    """K/V rows are views into a fused qkv row (strided); the native write (fp32/fp16 pages) lands the same bits as
    index_copy_, fp16 rounded to nearest even like .to(); a slot outside the pool raises (the native write, before
    writing anything)."""
    import workers.kv.codecs as codecs
    from kernels.cpu_native import native_kernels, native_kv_write

    library = native_kernels()
    native_active = library is not None and page_dtype != "bfloat16" and (
        page_dtype == "float32" or library.native_has_half())
    codec = codecs.IdentityCodec(codecs.FLOAT_DTYPES[page_dtype], NUM_KV_HEADS, head_dim)
    gen = torch.Generator().manual_seed(3)
    num_tokens, num_blocks, q_size = 21, 6, GROUP * NUM_KV_HEADS * head_dim
    kv_size = NUM_KV_HEADS * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen) * 300  # past fp16's finest steps
    key = qkv[:, q_size:q_size + kv_size].view(num_tokens, NUM_KV_HEADS, head_dim)
    value = qkv[:, q_size + kv_size:].view(num_tokens, NUM_KV_HEADS, head_dim)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:num_tokens]
    native = codec.allocate(0, num_blocks, BLOCK_SIZE, torch.device("cpu"))
    assert native_kv_write(key, value, slots, native["key"], native["value"]) == native_active
    codec.write(native, slots, key, value)
    monkeypatch.setattr(codecs, "native_kv_write", lambda *args: False)
    twin = codec.allocate(0, num_blocks, BLOCK_SIZE, torch.device("cpu"))
    codec.write(twin, slots, key, value)
    monkeypatch.undo()
    for name in ("key", "value"):
        assert torch.equal(native[name], twin[name]), name
        assert native[name].view(-1, NUM_KV_HEADS, head_dim)[slots].abs().sum() > 0
    bad = slots.clone()
    bad[-1] = num_blocks * BLOCK_SIZE
    before = native["key"].clone()
    with pytest.raises((IndexError, RuntimeError)):
        codec.write(native, bad, key * 2, value * 2)
    if native_active:  # index_copy_ (the torch path) may have written the good rows before raising
        assert torch.equal(native["key"], before)
