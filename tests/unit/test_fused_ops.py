"""The fused row-wise CPU ops (kernels/cpu_fused.c) against their torch twins on fresh random inputs, including
widths that leave a scalar tail, the in-place contracts, and the cases torch answers instead (NaN, other dtypes)."""

import pytest
import torch

from kernels.cpu_native import native_kernels
from kernels.fused_ops import (argmax_rows, reference_rms_norm, reference_rope, reference_silu_mul, rms_norm, rope_,
                               silu_mul)

pytestmark = [pytest.mark.skipif(native_kernels() is None, reason="no C compiler: only the torch twins run"),
              pytest.mark.usefixtures("two_threads")]

WIDTHS = [576, 100, 7]  # a multiple of every vector width, then tails


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("num_rows", [1, 32, 300])
def test_rms_norm_matches_torch(width, num_rows):
    generator = torch.Generator().manual_seed(width * num_rows)
    x = torch.randn(num_rows, width, generator=generator) * 3
    weight = torch.randn(width, generator=generator)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), reference_rms_norm(x, weight, 1e-5), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("width", WIDTHS)
def test_rms_norm_adds_the_residual_in_place_first(width):
    generator = torch.Generator().manual_seed(width)
    x, residual = torch.randn(9, width, generator=generator), torch.randn(9, width, generator=generator)
    weight = torch.randn(width, generator=generator)
    expected_stream = x + residual
    normed = rms_norm(x, weight, 1e-6, residual=residual)
    assert torch.equal(x, expected_stream)  # the same single rounding as torch's add
    torch.testing.assert_close(normed, reference_rms_norm(expected_stream, weight, 1e-6), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("num_rows", [1, 32, 70])
def test_silu_mul_matches_torch(width, num_rows):
    generator = torch.Generator().manual_seed(width + num_rows)
    gate_up = torch.randn(num_rows, 2 * width, generator=generator) * 4
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # e^{-|g|} underflows; never overflows
    torch.testing.assert_close(silu_mul(gate_up), reference_silu_mul(gate_up), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("head_dim", [64, 6])
def test_rope_rotates_a_strided_qkv_view_in_place(head_dim):
    generator = torch.Generator().manual_seed(head_dim)
    num_tokens, num_rotated, extra = 5, 4, 3  # extra: value heads after q/k in each row, left alone
    qkv = torch.randn(num_tokens, (num_rotated + extra) * head_dim, generator=generator)
    cos, sin = torch.randn(num_tokens, head_dim // 2, generator=generator), torch.randn(num_tokens, head_dim // 2)
    before = qkv.clone()
    view = qkv[:, :num_rotated * head_dim].view(num_tokens, num_rotated, head_dim)
    expected = reference_rope(view.clone(), cos, sin)
    assert rope_(view, cos, sin) is view
    torch.testing.assert_close(view, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, num_rotated * head_dim:], before[:, num_rotated * head_dim:])


@pytest.mark.parametrize("vocab", [49152, 1000, 13])
def test_argmax_matches_torch_including_ties(vocab):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(33, vocab, generator=generator)
    logits[1, [3, vocab - 1]] = 50.0  # a tie: the first index wins, as in torch
    logits[2] = float("-inf")
    logits[3] = 1.0
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))


def test_torch_answers_for_nan_and_other_dtypes():
    logits = torch.randn(4, 100)
    logits[2, 40] = float("nan")
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
    assert argmax_rows(logits)[2] == 40
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    weight = torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(rms_norm(x, weight, 1e-5), reference_rms_norm(x, weight, 1e-5))
    gate_up = torch.randn(3, 128, dtype=torch.float64)
    assert torch.equal(silu_mul(gate_up), reference_silu_mul(gate_up))


def test_a_rows_result_does_not_depend_on_the_batch():
    generator = torch.Generator().manual_seed(3)
    x, weight = torch.randn(200, 576, generator=generator), torch.randn(576, generator=generator)
    gate_up = torch.randn(200, 3072, generator=generator)
    assert torch.equal(rms_norm(x[17:18], weight, 1e-5)[0], rms_norm(x, weight, 1e-5)[17])
    assert torch.equal(silu_mul(gate_up[17:18])[0], silu_mul(gate_up)[17])


def test_shapes_that_do_not_fit_are_refused_before_any_native_read():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(32), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.randn(64), 1e-5, residual=torch.randn(3, 64))
    with pytest.raises(ValueError, match="cos/sin"):
        rope_(torch.randn(4, 2, 64), torch.randn(4, 16), torch.randn(4, 16))
