"""A real local Ray cluster serving one app over real gRPC, for the integration tests that break it on purpose."""

import contextlib
import socket
from typing import Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_serve(app: str, config) -> Iterator[int]:
    """Ray on 2 CPUs (the CI machine), Serve's gRPC proxy on a free port, `config` deployed as `app`; yields the
    gRPC port. Everything is shut down after, even when the deploy fails."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from cluster.app import GRPC_SERVICER, build_app

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        serve.start(grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[GRPC_SERVICER]),
                    http_options=HTTPOptions(port=free_port()))
        serve.run(build_app(config), name=app, route_prefix=f"/{app}")
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
