"""build_app: a pure function from a validated ServeConfig to a Ray Serve Application.

Each server class gets its deployment options from its tier's config (replicas or autoscaling,
fractional CPUs so a 2-core machine fits, max ongoing requests); tiers scale apart.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from cluster.config import ServeConfig, TierConfig
from cluster.grpc_ingress import Router
from cluster.servers import DecodeServer, PrefillServer

GRPC_SERVICER = "cluster.grpc_proxy.add_inference_servicer"  # Serve's proxy + prompt client cancellation
ROUTER_NUM_CPUS = 0.1  # tokenizing only; must not hold a core on small machines (DESIGN §11)


def deployment_options(tier: TierConfig, name: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": tier.num_cpus, "num_gpus": tier.num_gpus},
        "max_ongoing_requests": tier.max_ongoing_requests,
        "health_check_period_s": 10,
    }
    if tier.autoscaling is not None:
        options["autoscaling_config"] = tier.autoscaling.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = tier.num_replicas
    return options


def build_app(config: ServeConfig) -> Application:
    prefill = None
    if config.mode == "disaggregated":
        prefill = serve.deployment(PrefillServer).options(**deployment_options(config.prefill, "PrefillServer")).bind(
            config)
    decode_handles = [
        serve.deployment(DecodeServer).options(**deployment_options(tier, f"DecodeServer-{tier.name}")).bind(
            config, tier.name, prefill)
        for tier in config.decode_tiers
    ]
    router = serve.deployment(Router).options(name="Router", ray_actor_options={"num_cpus": ROUTER_NUM_CPUS},
                                              max_ongoing_requests=max(config.max_queued_requests, 1) * 2)
    return router.bind(config, decode_handles)
