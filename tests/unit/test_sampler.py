"""Sampler alone on synthetic logits: exclusions, seeds, greedy, logprobs."""

import torch

from workers.sampler import sample
from workers.sampling_params import SamplingParams

VOCAB = 1000


def random_logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def generators(count: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def test_top_k_never_emits_excluded_tokens():
    logits = random_logits(4, seed=0)
    params = [SamplingParams(temperature=1.5, top_k=5)] * 4
    allowed = [set(row.topk(5).indices.tolist()) for row in logits]
    gens = generators(4, seed=1)
    for _ in range(300):
        tokens = sample(logits, params, gens).token_ids
        assert all(token in allowed[i] for i, token in enumerate(tokens))


def test_top_p_never_emits_excluded_tokens_and_covers_the_nucleus():
    logits = random_logits(3, seed=2)
    top_p = 0.6
    params = [SamplingParams(temperature=1.0, top_p=top_p)] * 3
    nuclei = []
    for row in logits:
        probs, order = row.softmax(-1).sort(descending=True)
        keep = int((probs.cumsum(0) - probs < top_p).sum())  # smallest prefix reaching top_p
        nuclei.append(set(order[:keep].tolist()))
    gens = generators(3, seed=3)
    seen = [set() for _ in range(3)]
    for _ in range(2000):
        for i, token in enumerate(sample(logits, params, gens).token_ids):
            assert token in nuclei[i]
            seen[i].add(token)
    assert all(len(s) >= min(3, len(n)) for s, n in zip(seen, nuclei))  # it really samples


def test_top_k_and_top_p_combined():
    logits = random_logits(2, seed=4)
    params = [SamplingParams(temperature=2.0, top_k=10, top_p=0.5)] * 2
    allowed = [set(row.topk(10).indices.tolist()) for row in logits]
    gens = generators(2, seed=5)
    for _ in range(300):
        assert all(t in allowed[i] for i, t in enumerate(sample(logits, params, gens).token_ids))


def test_same_seed_same_tokens_regardless_of_batch_mates():
    logits = random_logits(1, seed=6)
    params = SamplingParams(temperature=1.0, seed=42)
    alone = [sample(logits, [params], [g]).token_ids[0]
             for g in [torch.Generator().manual_seed(42)] for _ in range(20)]
    mixed_logits = torch.cat([random_logits(2, seed=7), logits, random_logits(3, seed=8)])
    gen = torch.Generator().manual_seed(42)
    others = generators(5, seed=100)
    mixed = []
    for _ in range(20):
        row_params = [SamplingParams(temperature=0.7)] * 2 + [params] + [SamplingParams(temperature=0)] * 3
        row_gens = others[:2] + [gen] + [None] * 3
        mixed.append(sample(mixed_logits, row_params, row_gens).token_ids[2])
    assert mixed == alone
    assert len(set(alone)) > 1


def test_greedy_rows_take_argmax_and_need_no_generator():
    logits = random_logits(3, seed=9)
    out = sample(logits, [SamplingParams(temperature=0)] * 3, [None] * 3)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None, None, None]


def test_sampling_matches_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    expected = logits.softmax(-1)[0]
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    draws = 20000
    for _ in range(draws):
        counts[sample(logits, [SamplingParams(temperature=1.0)], [gen]).token_ids[0]] += 1
    assert torch.allclose(counts / draws, expected, atol=0.015)


def test_logprobs_report_raw_distribution():
    logits = random_logits(2, seed=10)
    out = sample(logits, [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)], [None, None])
    reference = torch.log_softmax(logits[0], -1)
    entry = out.logprobs[0]
    assert entry.token_id == out.token_ids[0]
    assert abs(entry.logprob - reference[entry.token_id].item()) < 1e-6
    assert [t for t, _ in entry.top] == reference.topk(3).indices.tolist()
    assert out.logprobs[1] is None
