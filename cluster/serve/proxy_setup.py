"""Serve's proxies, set up as they start: the gRPC front door binds the configured host.

Ray Serve 2.60 binds its gRPC proxy to every interface (`[::]:port`) whatever
`http_options.host` says, so an app configured for 127.0.0.1 would still take gRPC calls
from the network. Every proxy calls the function named by
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` (Serve's hook for proxy middleware) while it
starts, before its gRPC server binds; `setup` makes that bind use MOE_SERVE_GRPC_HOST, the
app's http_host (`set_ray_env` puts it in the environment Ray starts with). Unset, or an
address of every interface, changes nothing. tests/test_reliability_e2e.py checks the bind.
"""

import logging
import os

GRPC_HOST_ENV = "MOE_SERVE_GRPC_HOST"
CALLBACK = "cluster.serve.proxy_setup:setup"

log = logging.getLogger("ray.serve")


def setup() -> list:
    """Proxy start-up hook: no middleware; the gRPC server binds MOE_SERVE_GRPC_HOST."""
    host = os.environ.get(GRPC_HOST_ENV, "").strip("[]")
    if host in ("", "0.0.0.0", "::"):
        return []
    from ray.serve._private import default_impl

    bind = default_impl.add_grpc_address
    if getattr(bind, "moe_serve_host", None) == host:
        return []

    def add_grpc_address(server, address: str) -> None:
        port = address.rsplit(":", 1)[1]
        bind(server, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    add_grpc_address.moe_serve_host = host
    default_impl.add_grpc_address = add_grpc_address
    log.info("gRPC proxy binds %s only", host)
    return []
