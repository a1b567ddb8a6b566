"""Reach EVERY replica of a Serve deployment (a deployment handle routes each call to ONE replica).

Chaos runs and leak checks must ask each replica for its KV blocks, find each replica's process,
and kill replicas one by one. Serve gives no public API for that, so this module is the one place
that leans on Ray Serve 2.60's pinned internals (ray[serve]==2.60.0 in pyproject.toml):
  - replica actors are named actors `SERVE_REPLICA::<app>#<deployment>#<unique id>`;
  - `ReplicaActor.handle_request(pickled RequestMetadata, *args)` runs `RequestMetadata.call_method`
    of the user class and returns its (unary) result: what a deployment handle sends.
tests/unit/test_replicas.py fails when either changes shape; tests/integration/test_chaos.py uses it for real.
"""

from __future__ import annotations

import os
import pickle
import uuid
from dataclasses import dataclass
from typing import Any

REPLICA_PREFIX = "SERVE_REPLICA::"  # ray.serve._private.common.REPLICA_ID_FULL_ID_STR_PREFIX


@dataclass(frozen=True)
class Replica:
    """One live replica actor of one deployment."""

    app: str
    deployment: str
    replica_id: str  # Serve's unique id within the deployment (a replacement gets a new one)
    actor_name: str
    namespace: str

    @property
    def label(self) -> str:
        return f"{self.deployment}#{self.replica_id}"


@dataclass(frozen=True)
class ReplicaError:
    """A replica that did not answer (killed, restarting, timed out): kept apart from the answers' type."""

    message: str


@dataclass(frozen=True)
class ReplicaProcess:
    pid: int
    node_id: str  # Ray node id: a pid means something only on its own node


def parse_actor_name(name: str) -> tuple[str, str, str] | None:
    """`SERVE_REPLICA::app#deployment#id` -> (app, deployment, id); None for any other actor."""
    if not name.startswith(REPLICA_PREFIX):
        return None
    parts = name[len(REPLICA_PREFIX):].split("#")
    if len(parts) != 3:  # an app-less replica (`deployment#id`) is not one of ours
        return None
    app, deployment, replica_id = parts
    return app, deployment, replica_id


def list_replicas(app: str, deployment: str | None = None) -> list[Replica]:
    """Live replica actors of `app` (of one deployment, or all of them), sorted by deployment then id."""
    import ray

    found = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        parsed = parse_actor_name(actor["name"])
        if parsed is None or parsed[0] != app or (deployment is not None and parsed[1] != deployment):
            continue
        found.append(Replica(app=app, deployment=parsed[1], replica_id=parsed[2], actor_name=actor["name"],
                             namespace=actor["namespace"]))
    return sorted(found, key=lambda r: (r.deployment, r.replica_id))


def actor_of(replica: Replica):
    import ray

    return ray.get_actor(replica.actor_name, namespace=replica.namespace)


def request_metadata(app: str, method: str) -> bytes:
    """What a deployment handle pickles for a unary call of `method` (Serve 2.60 RequestMetadata)."""
    from ray.serve._private.common import RequestMetadata

    request_id = uuid.uuid4().hex
    return pickle.dumps(RequestMetadata(request_id=request_id, internal_request_id=request_id, call_method=method,
                                        app_name=app))


def call_each_replica(app: str, deployment: str, method: str, *args: Any,
                      timeout_s: float = 10.0) -> dict[str, Any]:
    """Call a unary user method on every live replica of `deployment` at once -> {replica id: result}.

    Relies on Serve 2.60's internal replica API (`ReplicaActor.handle_request` + a pickled RequestMetadata);
    the call takes one of the replica's max_ongoing_requests slots like any request. A replica that fails or
    does not answer in `timeout_s` maps to a ReplicaError (a killed replica may still be listed briefly).
    """
    import ray

    pending = {}
    for replica in list_replicas(app, deployment):
        try:
            pending[replica.replica_id] = actor_of(replica).handle_request.remote(request_metadata(app, method), *args)
        except ValueError as exc:  # gone between listing and lookup
            pending[replica.replica_id] = ReplicaError(_first_line(exc))
    results: dict[str, Any] = {}
    for replica_id, ref in pending.items():
        if isinstance(ref, ReplicaError):
            results[replica_id] = ref
            continue
        try:
            results[replica_id] = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref)  # e.g. a replacement replica still loading its model
            results[replica_id] = ReplicaError(f"no answer in {timeout_s} s")
        except Exception as exc:  # RayActorError (killed), the method's own error
            results[replica_id] = ReplicaError(_first_line(exc))
    return results


def replica_process(replica: Replica, timeout_s: float = 10.0) -> ReplicaProcess:
    """The replica's OS process (for RSS sampling). Uses Ray's `__ray_call__` (DeveloperAPI), not Serve's."""
    import ray

    def where(_instance) -> tuple[int, str]:
        return os.getpid(), ray.get_runtime_context().get_node_id()

    pid, node_id = ray.get(actor_of(replica).__ray_call__.remote(where), timeout=timeout_s)
    return ReplicaProcess(pid=pid, node_id=node_id)


def kill_replicas(app: str, deployment: str, count: int | None = None) -> list[str]:
    """Kill live replicas of `deployment` as a crash would (`no_restart=False`: Serve replaces them): the first
    `count` in id order, or all of them. Returns the killed replicas' ids."""
    import ray

    killed = []
    for replica in list_replicas(app, deployment):
        if count is not None and len(killed) >= count:
            break
        try:
            ray.kill(actor_of(replica), no_restart=False)
        except ValueError:  # already gone
            continue
        killed.append(replica.replica_id)
    return killed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
