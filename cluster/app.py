"""build_app: a pure function from a validated ServeConfig to a Ray Serve Application.

Each server class gets its deployment options from its tier's config (replicas or autoscaling,
fractional CPUs so a 2-core machine fits, max ongoing requests); tiers scale apart.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from cluster.config import ServeConfig, TierConfig
from cluster.grpc_ingress import Router
from cluster.ep_coordinator import EPCoordinator
from cluster.servers import DecodeServer, PrefillServer

GRPC_SERVICER = "cluster.grpc_proxy.add_inference_servicer"  # Serve's proxy + prompt client cancellation
ROUTER_NUM_CPUS = 0.1  # tokenizing only; must not hold a core on small machines (DESIGN §11)
EP_COORDINATOR_NUM_CPUS = 0.01  # a roster: a few calls a second
SOURCE_ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("cluster", "workers", "kernels", "protos")


def code_version(config: ServeConfig) -> str:
    """The version Serve compares to decide between restarting a deployment's replicas and only scaling them.

    Serve's default is a random version per `serve.run`, so re-deploying with nothing but a new replica count
    restarted every replica (every stream migrated). This one changes with the code (every source file) and with
    the config, except the replica counts: a changed count scales the tiers in place, and a replica removed
    that way drains within its tier's graceful_shutdown_timeout_s."""
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for path in sorted((SOURCE_ROOT / package).rglob("*")):
            if path.suffix in (".py", ".c") and path.is_file():
                digest.update(str(path.relative_to(SOURCE_ROOT)).encode())
                digest.update(path.read_bytes())
    scaling = {"num_replicas", "autoscaling"}
    settings = config.model_dump(mode="json")
    settings["prefill"] = {k: v for k, v in settings["prefill"].items() if k not in scaling}
    settings["decode_tiers"] = [{k: v for k, v in tier.items() if k not in scaling}
                                for tier in settings["decode_tiers"]]
    digest.update(repr(sorted(settings.items())).encode())
    return digest.hexdigest()[:16]


def deployment_options(tier: TierConfig, name: str, version: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": name,
        "version": version,
        "_internal": True,  # Serve accepts a version only from its own callers; see code_version
        "ray_actor_options": {"num_cpus": tier.num_cpus, "num_gpus": tier.num_gpus},
        "max_ongoing_requests": tier.max_ongoing_requests,
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": tier.graceful_shutdown_timeout_s,
    }
    if tier.autoscaling is not None:
        options["autoscaling_config"] = tier.autoscaling.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = tier.num_replicas
    return options


def _ep_coordinator(config: ServeConfig, tier: TierConfig, version: str):
    """An expert-parallel tier's roster (cluster/ep_coordinator.py): one tiny replica, off every request's path."""
    if tier.expert_parallel <= 1:
        return None
    grace_s = config.engine_config(tier).expert_parallel.regroup_grace_s
    return serve.deployment(EPCoordinator).options(
        name=f"EPCoordinator-{tier.name}", num_replicas=1, ray_actor_options={"num_cpus": EP_COORDINATOR_NUM_CPUS},
        version=version, _internal=True).bind(tier.name, tier.expert_parallel, grace_s)


def build_app(config: ServeConfig) -> Application:
    version = code_version(config)
    prefill = None
    if config.mode == "disaggregated":
        options = deployment_options(config.prefill, "PrefillServer", version)
        prefill = serve.deployment(PrefillServer).options(**options).bind(config)
    decode_handles = [
        serve.deployment(DecodeServer).options(**deployment_options(tier, f"DecodeServer-{tier.name}", version)
                                               ).bind(config, tier.name, prefill, _ep_coordinator(config, tier, version))
        for tier in config.decode_tiers
    ]
    router = serve.deployment(Router).options(name="Router", ray_actor_options={"num_cpus": ROUTER_NUM_CPUS},
                                              max_ongoing_requests=max(config.max_queued_requests, 1) * 2,
                                              version=version, _internal=True)
    return router.bind(config, decode_handles)
