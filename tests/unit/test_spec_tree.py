"""Token-tree drafts (workers/spec/tree.py) verified in one pass: greedy output is plain decoding's whichever
branch holds the right token (so the accepted path's K/V moves), the masks say what the tree says, sampling over
a tree keeps the target distribution, and nothing leaks."""

import random
from typing import Sequence

import pytest
import torch

from kernels.tree_mask import visible_tokens
from tests.unit.test_engine import GREEDY, assert_no_blocks_held, make_engine, random_prompts
from tests.unit.test_spec import plain_outputs, with_drafter
from workers.config import EngineConfig, SpeculativeConfig
from workers.engine import Engine
from workers.sampler import filtered_probs
from workers.sampling_params import SamplingParams
from workers.spec.drafter import Draft, DraftRequest
from workers.spec.ngram import NgramDrafter, lookup_candidates
from workers.spec.tree import ROOT, TreeBuilder, chain_parents, check_parents, depths, is_chain, tail_masks
from workers.spec.verify import verify_drafts


def ancestors(parents: Sequence[int], draft: int) -> set[int]:
    found = set()
    while draft != ROOT:
        found.add(draft)
        draft = parents[draft]
    return found


@pytest.mark.parametrize("seed", range(5))
def test_tail_masks_show_each_row_its_ancestors_only(seed):
    rng = random.Random(seed)
    num_drafts = rng.randint(1, 40)
    parents = tuple(rng.randint(-1, index - 1) for index in range(num_drafts))
    check_parents(parents, num_drafts)
    start = rng.randint(0, 100)  # tokens held before the tree's root (the known token) row
    seq_lens = torch.tensor([start + 1 + row for row in range(num_drafts + 1)], dtype=torch.int32)
    visible = visible_tokens(seq_lens, torch.tensor(tail_masks(parents)), start + num_drafts + 1)
    for row in range(num_drafts + 1):
        tree_rows = {0} | ({draft + 1 for draft in ancestors(parents, row - 1)} if row else set())
        expected = set(range(start)) | {start + tree_row for tree_row in tree_rows}
        assert set(visible[row].nonzero().flatten().tolist()) == expected
    assert depths(parents) == [len(ancestors(parents, draft)) for draft in range(num_drafts)]


def test_a_chain_is_all_ones_and_bad_trees_are_refused():
    assert tail_masks(chain_parents(5)) == [-1] * 6
    assert is_chain(chain_parents(5)) and not is_chain((-1, -1))
    with pytest.raises(ValueError, match="parent"):
        check_parents((-1, 1), 2)
    with pytest.raises(ValueError, match="at most 63"):
        check_parents(chain_parents(64), 64)


def test_tree_builder_keeps_the_heaviest_nodes_with_their_ancestors():
    tokens, parents = TreeBuilder(5).build([((1, 2, 3), 2.0), ((1, 2, 4), 1.0), ((5, 6), 1.5)])
    # node weights: 1:3, 2:3, 3:2, 5:1.5, 6:1.5, 4:1 -> 4 is dropped; breadth first, heavier first
    assert tokens == (1, 5, 2, 6, 3)
    assert parents == (ROOT, ROOT, 0, 1, 2)
    assert TreeBuilder(4).build([]) == ((), ())


def test_ngram_tree_merges_several_earlier_continuations():
    context = [1, 2, 3, 9, 4, 1, 2, 3, 7, 5, 1, 2, 3]
    candidates = lookup_candidates(context, 2, 3, 2, max_candidates=3)
    # (1 2 3) recurs twice, most recent first; the shorter suffix (2 3) only finds the same places again
    assert [c for c, _ in candidates] == [(7, 5), (9, 4)]
    assert candidates[0][1] > candidates[1][1]
    # 4 nodes, worth weight x 0.8 per level down: 7 (3), 5 (2.4), 9 (2.4), then 7-5's 1 (1.92) before 9's 4 (1.92)
    [draft] = NgramDrafter(2, 3, tree_width=3).propose([DraftRequest("r", context, 4)])
    assert draft.token_ids == (7, 9, 5, 1) and draft.parents == (ROOT, ROOT, 0, 2)
    # both earlier runs went on with 9: a shared first node, then the branch
    context = [1, 2, 3, 9, 4, 1, 2, 3, 9, 5, 1, 2, 3]
    [draft] = NgramDrafter(2, 3, tree_width=3).propose([DraftRequest("r", context, 5)])
    assert draft.token_ids == (9, 5, 4, 1, 2) and draft.parents == (ROOT, 0, 0, 1, 3)
    assert draft.probs is None


class TreeScriptedDrafter:
    """A tree whose right path (plain decoding's tokens) hides among wrong branches at a random place: each depth
    gets `width` children, the right one at a random index, so the accepted path's K/V sits in scattered slots."""

    name = "tree-scripted"

    def __init__(self, prompts, outputs, width: int, seed: int, error_rate: float = 0.0):
        self.continuations = {tuple(p): o for p, o in zip(prompts, outputs)}
        self.width = width
        self.rng = random.Random(seed)
        self.error_rate = error_rate

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        drafts = []
        for request in requests:
            tokens = list(request.token_ids)
            truth: list[int] = []
            for prompt, continuation in self.continuations.items():
                if tuple(tokens[:len(prompt)]) == prompt:
                    done = len(tokens) - len(prompt)
                    truth = continuation[done:done + request.num_draft_tokens]
            draft_tokens: list[int] = []
            parents: list[int] = []
            parent = ROOT
            for right in truth:
                if len(draft_tokens) + self.width > request.num_draft_tokens:
                    break
                if self.rng.random() < self.error_rate:
                    right = self.rng.randrange(3, 200)
                wrong = [t for t in self.rng.sample(range(3, 200), self.width + 1) if t != right][:self.width - 1]
                options = wrong[:]
                options.insert(self.rng.randrange(self.width), right)
                next_parent = parent
                for token in options:
                    if token == right:
                        next_parent = len(draft_tokens)
                    draft_tokens.append(token)
                    parents.append(parent)
                parent = next_parent
            drafts.append(Draft(tuple(draft_tokens), parents=tuple(parents)))
        return drafts

    def forget(self, request_id: str) -> None:
        pass


@pytest.mark.parametrize("kv_codec,error_rate", [("auto", 0.0), ("auto", 0.3), ("tq-k4v4", 0.2)])
def test_greedy_tree_output_is_plain_decoding(tiny_loaded, kv_codec, error_rate):
    prompts = random_prompts(6, seed=21)
    plain = plain_outputs(tiny_loaded, prompts, kv_codec=kv_codec)
    drafter = TreeScriptedDrafter(prompts, plain, width=3, seed=2, error_rate=error_rate)
    engine = with_drafter(make_engine(tiny_loaded, kv_codec=kv_codec, max_num_batched_tokens=32), drafter,
                          num_speculative_tokens=12)
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == plain
    stats = engine.speculator.stats
    assert stats.num_verify_passes > 10
    # three right tokens per 3-wide, 4-deep tree when nothing is corrupted
    if error_rate == 0.0:
        assert stats.mean_acceptance_length > 3.5
    assert_no_blocks_held(engine)


def test_tree_rejections_with_preemption_leak_no_block(tiny_loaded):
    prompts = random_prompts(16, seed=23)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain = plain_outputs(tiny_loaded, prompts, params)
    drafter = TreeScriptedDrafter(prompts, plain, width=2, seed=4, error_rate=0.5)
    engine = with_drafter(make_engine(tiny_loaded, num_kv_blocks=40, max_num_batched_tokens=24), drafter,
                          num_speculative_tokens=8)
    assert [c.token_ids for c in engine.generate(prompts, params)] == plain
    assert engine.scheduler.num_preemptions > 0
    assert engine.speculator.stats.num_draft_tokens - engine.speculator.stats.num_accepted_tokens > 500
    assert_no_blocks_held(engine)


def test_ngram_tree_config_serves_plain_greedy_output(tiny_loaded):
    config = EngineConfig(model=tiny_loaded.path, block_size=4, num_kv_blocks=256,
                          speculative=SpeculativeConfig(method="ngram", ngram_min=1, ngram_max=3, tree_width=3,
                                                        num_speculative_tokens=8, policy="fixed"))
    engine = Engine(config, loaded=tiny_loaded)
    prompts = random_prompts(4, seed=15)
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == plain_outputs(tiny_loaded, prompts)
    assert engine.speculator.stats.num_verify_passes > 0
    with pytest.raises(ValueError, match="tree_width"):
        SpeculativeConfig(method="draft_model", draft_model="x", tree_width=2)
    SpeculativeConfig(method="eagle3", tree_width=4)  # EAGLE-2's dynamic tree


def test_tree_verification_keeps_the_target_distribution():
    """Root children a, b (point masses) and a's child c: the first token is distributed as p0, the second (after
    an accepted a or b) as that draft's row. 20,000 draws; total variation within sampling noise."""
    torch.manual_seed(5)
    vocab = 6
    logits = torch.randn(4, vocab) * 1.2
    params = SamplingParams(temperature=0.9)
    probs = filtered_probs(logits, [params] * 4)
    a, b, c = int(probs[0].argmax()), int(probs[0].argsort()[-2]), 3
    drafts, parents = (a, b, c), (ROOT, ROOT, 0)
    generator = torch.Generator().manual_seed(9)
    first = torch.zeros(vocab)
    second = {a: torch.zeros(vocab), b: torch.zeros(vocab)}
    trials = 20000
    greedy = logits.argmax(dim=-1).tolist()
    for _ in range(trials):
        tokens = verify_drafts(logits, greedy, drafts, params, generator, None, parents).token_ids
        first[tokens[0]] += 1
        if tokens[0] in second:
            assert len(tokens) >= 2
            second[tokens[0]][tokens[1]] += 1
        else:
            assert len(tokens) == 1
    assert 0.5 * (first / trials - probs[0]).abs().sum() < 0.02
    for token, row in ((a, 1), (b, 2)):
        histogram = second[token] / second[token].sum()
        assert 0.5 * (histogram - probs[row]).abs().sum() < 0.04, (token, histogram, probs[row])


def test_greedy_tree_walk_follows_the_matching_child():
    logits = torch.zeros(5, 10)
    greedy = [4, 7, 2, 8, 9]  # target argmax at the root row and at each draft's row
    drafts, parents = (3, 4, 7, 2), (ROOT, ROOT, 1, 1)  # root children 3 and 4; 4's children 7 and 2
    verified = verify_drafts(logits, greedy, drafts, SamplingParams(temperature=0), None, None, parents)
    # root: 4 (draft 1) -> row 2 wants 2: draft 3 (a child of draft 1) -> row 4 wants 9: no child, bonus 9
    assert verified.token_ids == (4, 2, 9)
    assert verified.accepted_drafts == (1, 3)
