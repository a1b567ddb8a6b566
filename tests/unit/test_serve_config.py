"""ServeConfig: YAML round trip, validation errors that name the field, tier routing rules."""

import pytest
from pydantic import ValidationError

from cluster.config import ServeConfig, UnknownTierError


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    config = ServeConfig()
    assert config.mode == "disaggregated" and config.grpc_port == 9000
    assert [t.name for t in config.decode_tiers] == ["default", "long"]
    path = tmp_path / "serve.yaml"
    path.write_text(config.to_yaml())
    assert ServeConfig.from_yaml(path) == config


def test_the_default_long_tier_evicts_by_value_aware_scores():
    config = ServeConfig()
    long_engine = config.engine_config(config.tier_for(5000))
    assert long_engine.kv_eviction.policy == "value_aware" and long_engine.kv_eviction.budget == 0.25
    assert config.engine_config(config.tier_for(10)).kv_eviction.policy == "none"
    assert config.engine_config(config.prefill).kv_eviction.policy == "none"  # prefill never evicts


def test_eviction_without_a_budget_is_refused():
    with pytest.raises(ValidationError, match="needs a budget"):
        ServeConfig.model_validate({"decode_tiers": [{"name": "a", "engine": {"kv_eviction": {"policy": "h2o"}}}]})


def test_routing_by_hint_and_prompt_length():
    config = ServeConfig()
    assert config.tier_for(10).name == "default"
    assert config.tier_for(5000).name == "long"
    assert config.tier_for(10, hint="long").name == "long"
    with pytest.raises(UnknownTierError, match="unknown decode tier 'huge'"):
        config.tier_for(10, hint="huge")


def test_tier_engine_overrides_merge_and_validate():
    config = ServeConfig.model_validate({
        "engine": {"block_size": 32},
        "decode_tiers": [{"name": "default"}, {"name": "long", "min_prompt_tokens": 100,
                                               "engine": {"max_num_seqs": 8}}],
    })
    long_engine = config.engine_config(config.decode_tiers[1])
    assert long_engine.block_size == 32 and long_engine.max_num_seqs == 8 and long_engine.role == "decode"
    assert config.engine_config(config.prefill).role == "prefill"
    assert ServeConfig(mode="unified").engine_config(ServeConfig().decode_tiers[0]).role == "unified"


@pytest.mark.parametrize("data,needle", [
    ({"grpc_port": 0}, "grpc_port"),
    ({"mode": "sideways"}, "mode"),
    ({"bogus": 1}, "bogus"),
    ({"decode_tiers": []}, "decode_tiers"),
    ({"decode_tiers": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"decode_tiers": [{"name": "a", "min_prompt_tokens": 5}]}, "min_prompt_tokens: 0"),
    ({"decode_tiers": [{"name": "a", "engine": {"block_size": 3}}]}, "block_size"),
    ({"decode_tiers": [{"name": "a", "engine": {"nope": 3}}]}, "unknown option"),
    ({"decode_tiers": [{"name": "a", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}]}, "min_replicas"),
    ({"prefill": {"name": "Bad Name"}}, "prefill.name"),
])
def test_bad_config_names_the_field(data, needle):
    with pytest.raises(ValidationError) as info:
        ServeConfig.model_validate(data)
    assert needle in str(info.value)


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        ServeConfig.from_yaml(path)


def test_code_version_ignores_replica_counts_only():
    """A new replica count scales a tier in place (same version: Serve keeps the replicas); any other change, to
    the config or the code, restarts them (a new version)."""
    from cluster.app import code_version

    base = ServeConfig.model_validate({"decode_tiers": [{"name": "default", "num_replicas": 2}]})
    scaled = ServeConfig.model_validate({"decode_tiers": [{"name": "default", "num_replicas": 1}],
                                         "prefill": {"name": "prefill", "autoscaling": {"max_replicas": 3}}})
    changed = ServeConfig.model_validate({"decode_tiers": [{"name": "default", "num_replicas": 2,
                                                            "engine": {"block_size": 32}}]})
    assert code_version(base) == code_version(scaled)
    assert code_version(base) != code_version(changed)


def test_build_app_pins_the_version_and_the_graceful_shutdown():
    from cluster.app import build_app, code_version

    config = ServeConfig.model_validate({"decode_tiers": [{"name": "default", "graceful_shutdown_timeout_s": 3}]})
    app = build_app(config)
    router = app._bound_deployment
    decode = router.init_args[1][0]._bound_deployment
    assert router.version == decode.version == code_version(config)
    assert decode.name == "DecodeServer-default"
    assert decode._deployment_config.graceful_shutdown_timeout_s == 3


@pytest.mark.parametrize("tier,needle", [
    ({"expert_parallel": 2}, "num_replicas must be 2"),  # one replica cannot hold half the experts
    ({"expert_parallel": 2, "num_replicas": 2, "autoscaling": {"max_replicas": 4}}, "autoscaling unset"),
])
def test_expert_parallel_tier_needs_exactly_its_replicas(tier, needle):
    with pytest.raises(ValidationError, match=needle):
        ServeConfig.model_validate({"decode_tiers": [{"name": "default", **tier}]})
    with pytest.raises(ValidationError, match="built for decode tiers"):
        ServeConfig.model_validate({"prefill": {"name": "prefill", "expert_parallel": 2, "num_replicas": 2}})


def test_build_app_gives_an_expert_parallel_tier_its_roster():
    from cluster.app import build_app

    config = ServeConfig.model_validate({"decode_tiers": [
        {"name": "default"}, {"name": "moe", "min_prompt_tokens": 10, "num_replicas": 2, "expert_parallel": 2,
                              "engine": {"expert_parallel": {"regroup_grace_s": 4}}}]})
    decodes = [bound._bound_deployment for bound in build_app(config)._bound_deployment.init_args[1]]
    assert decodes[0].init_args[3] is None
    coordinator = decodes[1].init_args[3]._bound_deployment
    assert coordinator.name == "EPCoordinator-moe" and coordinator.init_args == ("moe", 2, 4.0)
    assert coordinator._deployment_config.num_replicas == 1
