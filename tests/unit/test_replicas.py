"""cluster/tools/replicas.py leans on Ray Serve 2.60 internals: these tests fail when those change shape.

(The real calls run in tests/integration/test_chaos.py; here only the parts that need no Ray cluster.)
"""

import dataclasses
import inspect
import pickle

import pytest

from cluster.tools.replicas import REPLICA_PREFIX, parse_actor_name, request_metadata


def test_replica_actor_names_are_parsed_as_serve_writes_them():
    from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX, DeploymentID, ReplicaID

    assert REPLICA_PREFIX == REPLICA_ID_FULL_ID_STR_PREFIX
    name = ReplicaID("ab12cd34", DeploymentID(name="DecodeServer-default", app_name="tierserve")).to_full_id_str()
    assert parse_actor_name(name) == ("tierserve", "DecodeServer-default", "ab12cd34")
    assert parse_actor_name("SERVE_CONTROLLER_ACTOR") is None
    assert parse_actor_name(f"{REPLICA_PREFIX}Router#xyz") is None  # no app name: not one of ours


def test_request_metadata_is_what_the_replica_actor_unpickles():
    from ray.serve._private.common import RequestMetadata

    fields = {f.name for f in dataclasses.fields(RequestMetadata)}
    assert {"request_id", "internal_request_id", "call_method", "app_name"} <= fields
    metadata = pickle.loads(request_metadata("tierserve", "kv_stats"))
    assert isinstance(metadata, RequestMetadata)
    assert metadata.call_method == "kv_stats" and metadata.app_name == "tierserve"
    # A plain unary Python call: neither HTTP nor gRPC (those wrap their arguments), not streaming.
    assert not metadata.is_http_request and not metadata.is_grpc_request and not metadata.is_streaming
    assert metadata._reserved_slot_token is None  # else the replica looks the slot up and refuses the call


def test_replica_actor_entry_point_takes_pickled_metadata_then_the_arguments():
    from ray.serve._private.replica import ReplicaActor

    parameters = list(inspect.signature(ReplicaActor.handle_request).parameters.values())
    assert [p.name for p in parameters[:2]] == ["self", "pickled_request_metadata"]
    assert parameters[2].kind is inspect.Parameter.VAR_POSITIONAL
    assert inspect.iscoroutinefunction(ReplicaActor.handle_request)
    source = inspect.getsource(ReplicaActor._preprocess_request_args)
    assert "pickle.loads(pickled_request_metadata)" in source


def test_serve_version_is_the_pinned_one():
    import ray

    # A new Serve may rename any of the above: re-read ray/serve/_private/replica.py before moving the pin.
    assert ray.__version__ == "2.60.0"


@pytest.mark.parametrize("name", ["handle_request", "__ray_call__"])
def test_actor_methods_used_exist(name):
    from ray.actor import _modify_class
    from ray.serve._private.replica import ReplicaActor

    assert hasattr(_modify_class(ReplicaActor), name)
