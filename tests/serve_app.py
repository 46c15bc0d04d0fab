"""Start and stop the whole Ray Serve app on a local (loopback) cluster, for end-to-end tests."""

import socket
from contextlib import contextmanager

import ray
from ray import serve

from cluster.serve import app_config
from cluster.serve.builder import deploy, set_ray_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(model, address: str | None = None, **config):
    """Deploy the app from config (an AppConfig as a dict) and yield (cfg, http base URL, grpc target)."""
    cfg = app_config.decode({"model": str(model), "http_port": free_port(), "grpc_port": free_port(), **config})
    if address:
        ray.init(address=address, namespace="moe-serve", _node_ip_address="127.0.0.1", log_to_driver=False)
    else:
        set_ray_env()
        ray.init(_node_ip_address="127.0.0.1", num_cpus=16, include_dashboard=False, namespace="moe-serve",
                 log_to_driver=False)
    try:
        deploy(cfg, str(model))
        yield cfg, f"http://127.0.0.1:{cfg.http_port}", f"127.0.0.1:{cfg.grpc_port}"
    finally:
        serve.shutdown()
        ray.shutdown()
