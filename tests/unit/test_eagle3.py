"""EAGLE-3 (workers/spec/eagle3*.py) on a tiny random checkpoint: the head's checkpoint layout, the training-time
test's unrolled attention against the drafter's inference path, lossless verification in the engine, training
that learns and resumes, and the head's features crossing the prefill/decode split."""

import json
import random

import pytest
import torch

from tests.unit.test_engine import assert_no_blocks_held, make_engine, random_prompts
from workers.config import EngineConfig, SpeculativeConfig
from workers.engine import Engine
from workers.sampling_params import SamplingParams
from workers.spec.drafter import DraftRequest
from workers.spec.eagle3 import Eagle3Head, default_aux_layer_ids, head_config_for
from workers.spec.eagle3_drafter import Eagle3Drafter
from workers.spec.eagle3_train import TrainConfig, target_features, train, ttt_forward

VLLM_NAMES = {"fc.weight", "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
              "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
              "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
              "midlayer.post_attention_layernorm.weight", "midlayer.mlp.gate_proj.weight",
              "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight", "norm.weight", "lm_head.weight",
              "d2t", "t2d"}


def random_head(loaded, draft_vocab_size: int = 96, seed: int = 0, norm_output: bool = False) -> Eagle3Head:
    torch.manual_seed(seed)
    config = head_config_for(loaded.config, draft_vocab_size, fc_norm=True, norm_output=norm_output)
    head = Eagle3Head(config, loaded.model.embed_tokens.weight)
    vocab = torch.randperm(loaded.config.vocab_size)[:draft_vocab_size].sort().values
    head.d2t.copy_(vocab - torch.arange(draft_vocab_size))
    head.t2d[vocab] = True
    for parameter in head.parameters():  # norms away from 1, so that a mix-up of them shows
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    return head.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def head_dir(tiny_loaded, tmp_path_factory):
    directory = tmp_path_factory.mktemp("eagle3-head")
    random_head(tiny_loaded).save(str(directory))
    return directory


def test_checkpoint_layout_is_vllms_and_round_trips(tiny_loaded, head_dir):
    from safetensors.torch import load_file

    names = set(load_file(str(head_dir / "model.safetensors")))
    assert VLLM_NAMES <= names
    assert {f"fc_norm.{i}.weight" for i in range(3)} <= names  # EAGLE 3.1: one norm per captured layer
    config = json.loads((head_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 96
    assert config["eagle_aux_hidden_state_layer_ids"] == list(default_aux_layer_ids(tiny_loaded.config.num_layers))
    loaded_head = Eagle3Head.load(str(head_dir), tiny_loaded.model.embed_tokens.weight)
    original = random_head(tiny_loaded)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded_head.state_dict()[name], tensor), name


@pytest.mark.parametrize("norm_output", [False, True])
def test_training_unroll_is_what_drafting_computes(tiny_loaded, norm_output):
    """The training-time test's step s, row i (its attention over the step-0 keys <= i and its own chain) equals
    the drafter catching up over positions 0..i and then drafting s steps (teacher-forced tokens)."""
    head = random_head(tiny_loaded, norm_output=norm_output)
    rng = random.Random(3)
    window = [rng.randrange(3, 200) for _ in range(24)]
    features = target_features(tiny_loaded, [window], head.config.aux_layer_ids, top_k=4)
    with torch.no_grad():
        unrolled = ttt_forward(head, features.aux, features.token_ids, ttt_steps=3)
    for chain in (0, 7, 15):
        drafter = Eagle3Drafter(head)
        drafter.add_features("r", 0, features.aux[0, :chain + 1].float())
        state = drafter.states["r"]
        with torch.no_grad():
            fed, logits = drafter._rows(state, torch.tensor(window[1:chain + 2]), head.fuse(features.aux[0, :chain + 1]
                                                                                        .float()),
                                        torch.arange(chain + 1), cached=True)
            torch.testing.assert_close(logits[-1], unrolled[0][0, chain], rtol=1e-4, atol=1e-4)
            state_in = fed[-1:]
            for step in (1, 2):
                fed, logits = drafter._rows(state, torch.tensor([window[chain + 1 + step]]), state_in,
                                            torch.tensor([chain + step]), cached=False)
                torch.testing.assert_close(logits[-1], unrolled[step][0, chain], rtol=1e-4, atol=1e-4)
                state_in = fed


def test_eagle3_drafts_are_verified_losslessly(tiny_loaded, head_dir):
    prompts = random_prompts(5, seed=31)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = [c.token_ids for c in make_engine(tiny_loaded).generate(prompts, params)]
    config = EngineConfig(model=tiny_loaded.path, block_size=4, num_kv_blocks=256, max_num_batched_tokens=16,
                          speculative=SpeculativeConfig(method="eagle3", eagle_head=str(head_dir)))
    engine = Engine(config, loaded=tiny_loaded)
    assert [c.token_ids for c in engine.generate(prompts, params)] == plain
    assert engine.speculator.stats.num_verify_passes > 0
    assert not engine.speculator.drafter.states  # every finished request's head state is gone
    assert_no_blocks_held(engine)


def test_missing_head_is_a_clear_error(tiny_loaded, tmp_path):
    config = EngineConfig(model=tiny_loaded.path, num_kv_blocks=64,
                          speculative=SpeculativeConfig(method="eagle3", eagle_head=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match="train-drafter eagle3"):
        Engine(config, loaded=tiny_loaded)


def test_training_learns_and_resumes(tiny_loaded, tmp_path):
    """A few hundred steps on the target's own greedy text: the unrolled loss falls; a second run with the same
    out_dir resumes from the saved step instead of starting over."""
    rng = random.Random(4)
    engine = make_engine(tiny_loaded)
    prompts = [[rng.randrange(3, 200) for _ in range(8)] for _ in range(12)]
    continuations = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    windows = [(p + c.token_ids)[:48] for p, c in zip(prompts, continuations)]
    config = TrainConfig(seq_len=48, batch_size=4, max_steps=60, draft_vocab_size=128, save_every=30, lr=3e-3)
    losses = []
    import workers.spec.eagle3_train as trainer

    original = trainer.ttt_loss

    def recording(*args, **kwargs):
        loss, agreement = original(*args, **kwargs)
        losses.append(loss.item())
        return loss, agreement

    trainer.ttt_loss = recording
    try:
        head = train(tiny_loaded, windows, str(tmp_path), config)
        assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
        assert head.config.extra["trained_steps"] == 60
        losses.clear()
        train(tiny_loaded, windows, str(tmp_path), TrainConfig(**{**config.__dict__, "max_steps": 70}))
        assert len(losses) == 10  # resumed at step 60
    finally:
        trainer.ttt_loss = original
    drafter = Eagle3Drafter(Eagle3Head.load(str(tmp_path), tiny_loaded.model.embed_tokens.weight))
    drafter.add_features("r", 0, target_features(tiny_loaded, [windows[0][:20]], drafter.capture_layer_ids,
                                                 top_k=2).aux[0, :19].float())
    assert len(drafter.propose([DraftRequest("r", windows[0][:20], 3)])[0].token_ids) == 3


def test_eagle3_tree_nodes_are_what_the_chain_would_draft_along_their_path(tiny_loaded):
    """Every node of a tree (width 3, 10 nodes) is among the top-3 of its parent's logits as a chain drafter computes
    them replaying the node's path: the tree rows' masks, positions and K/V slots are the chain's."""
    from workers.spec.tree import ROOT, check_parents

    head = random_head(tiny_loaded, seed=4)
    rng = random.Random(5)
    window = [rng.randrange(3, 200) for _ in range(20)]
    aux = target_features(tiny_loaded, [window], head.config.aux_layer_ids, top_k=2).aux[0].float()
    tree_drafter = Eagle3Drafter(head, tree_width=3)
    tree_drafter.add_features("r", 0, aux[:19])
    [draft] = tree_drafter.propose([DraftRequest("r", window, 10)])
    check_parents(draft.parents, len(draft.token_ids))
    assert len(draft.token_ids) == 10 and max(depths_of(draft.parents)) >= 3
    for node, token in enumerate(draft.token_ids):
        path = []
        ancestor = draft.parents[node]
        while ancestor != ROOT:
            path.insert(0, draft.token_ids[ancestor])
            ancestor = draft.parents[ancestor]
        chain = Eagle3Drafter(head)
        chain.add_features("r", 0, aux[:19])
        state = chain.states["r"]
        with torch.no_grad():
            fed, logits = chain._rows(state, torch.tensor(window[1:20]), head.fuse(aux[:19]), torch.arange(19),
                                      cached=True)
            for step, fed_token in enumerate(path):
                fed, logits = chain._rows(state, torch.tensor([fed_token]), fed[-1:], torch.tensor([19 + step]),
                                          cached=False)
        top = head.to_target_ids(logits[-1].topk(3).indices).tolist()
        assert token in top, (node, path, token, top)


def depths_of(parents):
    from workers.spec.tree import depths

    return depths(parents)


def test_eagle3_tree_drafts_are_verified_losslessly(tiny_loaded, head_dir):
    prompts = random_prompts(5, seed=33)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = [c.token_ids for c in make_engine(tiny_loaded).generate(prompts, params)]
    config = EngineConfig(model=tiny_loaded.path, block_size=4, num_kv_blocks=256, max_num_batched_tokens=32,
                          speculative=SpeculativeConfig(method="eagle3", eagle_head=str(head_dir), tree_width=3,
                                                        num_speculative_tokens=8, policy="fixed"))
    engine = Engine(config, loaded=tiny_loaded)
    assert [c.token_ids for c in engine.generate(prompts, params)] == plain
    assert engine.speculator.stats.num_verify_passes > 0
    assert not engine.speculator.drafter.states
    assert_no_blocks_held(engine)
