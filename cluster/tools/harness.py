"""Run the app, or one front door, inside this process's reach: for tests, benchmarks and quick trials.

`running_app` starts a local loopback Ray cluster and deploys the whole app on it;
`serving` runs any ASGI app (an OpenAI front door over a local engine) under uvicorn in a
thread. Both hand back where to call them and stop what they started on the way out.
"""

import contextlib
import os
import random
import socket
import threading
import time


def free_port() -> int:
    """A free port for a server that will bind it later (Ray Serve's proxies take a port number,
    not a socket). Drawn below the kernel's ephemeral range, where port-0 binds and outgoing
    connections never land, so no other process takes it between this check and the bind."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low}")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@contextlib.contextmanager
def running_app(model, address: str | None = None, **config):
    """Deploy the app from config (an AppConfig as a dict) and yield (cfg, http base URL, grpc target)."""
    # Before ray is imported: keep a local cluster on loopback.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from cluster.serve import app_config
    from cluster.serve.builder import deploy, set_ray_env

    cfg = app_config.decode({"model": str(model), "http_port": free_port(), "grpc_port": free_port(), **config})
    if address:
        ray.init(address=address, namespace="moe-serve", _node_ip_address="127.0.0.1", log_to_driver=False)
    else:
        set_ray_env(cfg)
        ray.init(_node_ip_address="127.0.0.1", num_cpus=16, include_dashboard=False, namespace="moe-serve",
                 log_to_driver=False)
    try:
        deploy(cfg, str(model))
        yield cfg, f"http://127.0.0.1:{cfg.http_port}", f"127.0.0.1:{cfg.grpc_port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def serving(app):
    """A real uvicorn server for an ASGI app, on a free port: -> its base URL while the block runs."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
