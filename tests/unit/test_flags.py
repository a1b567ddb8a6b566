"""Flags derived from the configuration models: every field has one, none re-declares a default, old names work."""

import argparse

import pytest

from cluster.cli import build_parser
from cluster.config import AutoscalingConfig, ServeConfig, TierConfig
from cluster.flags import ENGINE_SKIP, engine_config, engine_flags, model_flags, serve_overrides
from workers.config import EngineConfig, EvictionConfig, ExpertParallelConfig, MoERoutingConfig, SpeculativeConfig
from workers.sampling_params import SamplingParams


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("model", [ServeConfig, TierConfig, AutoscalingConfig, EngineConfig, EvictionConfig,
                                   SpeculativeConfig, MoERoutingConfig, ExpertParallelConfig])
def test_every_field_is_described(model):
    assert [name for name, info in model.model_fields.items() if not info.description] == []


def test_every_scalar_engine_field_is_a_flag_and_no_flag_sets_a_default():
    names = {flag.name for flag in engine_flags()}
    nested = {"kv_eviction": EvictionConfig, "speculative": SpeculativeConfig, "moe_routing": MoERoutingConfig}
    expected = {name for name in EngineConfig.model_fields if name not in ENGINE_SKIP and name not in nested}
    for prefix, model in nested.items():
        expected |= {f"{prefix}.{name}" for name in model.model_fields}
    assert expected == names
    args = parse("run", "hi")
    assert all(getattr(args, flag.dest) is None for flag in engine_flags())
    assert engine_config(args) == EngineConfig()  # nothing given: exactly the model's defaults


def test_old_flag_names_still_work():
    args = parse("run", "hi", "--threads", "3", "--no-prefix-caching", "--kv-eviction", "snapkv", "--kv-budget", "0.5",
                 "--kv-budget-blocks", "8", "--no-pack-cpu-weights", "--no-block-quant-linears",
                 "--no-native-decode-layers", "--kv-exclude-layers", "0,2", "--max-num-seqs", "8")
    config = engine_config(args)
    assert (config.num_threads, config.enable_prefix_caching, config.pack_cpu_weights, config.block_quant_linears,
            config.native_decode_layers, config.kv_exclude_layers, config.max_num_seqs) == (3, False, False, False,
                                                                                            False, (0, 2), 8)
    assert (config.kv_eviction.policy, config.kv_eviction.budget, config.kv_eviction.budget_blocks) == ("snapkv",
                                                                                                        0.5, 8)


def test_serve_flags_override_only_what_is_given():
    assert serve_overrides(parse("serve")) == {}
    assert serve_overrides(parse("serve", "--grpc-port", "9100", "--mode", "unified", "--max-migrations", "0")) == {
        "grpc_port": 9100, "mode": "unified", "max_migrations": 0}
    assert {flag.name for flag in model_flags(ServeConfig, frozenset({"engine", "prefill", "decode_tiers"}))} == {
        name for name in ServeConfig.model_fields if name not in {"engine", "prefill", "decode_tiers"}}


def test_sampling_flags_default_to_sampling_params_but_greedy():
    args = parse("run", "hi")
    assert args.max_tokens == SamplingParams().max_tokens == parse("generate", "hi").max_tokens
    assert args.temperature == 0.0 and args.top_p == SamplingParams().top_p and args.top_k == SamplingParams().top_k
