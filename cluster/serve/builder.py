"""The one place the Serve application is assembled: every `serve.deployment(...).bind(...)`.

The app is deployed the way Serve deploys a config file (`serve_config`): the import path
`cluster.serve.builder:app_builder` with our config as its args, and, with autoscaling on, the
application-level policy `cluster.serve.autoscale_policy:AppPolicy`, which sees every deployment
at once (the routing load is reported by Attention but scales ExpertGroup-<g>). `moe-serve
up` and the Helm chart's serveConfigV2 deploy the same thing.
"""

import os
import time

import msgspec
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.api.access import ApiKeys, require_keys
from cluster.observe.names import ATTENTION, FRONTEND, GROUP_PREFIX
from cluster.serve import proxy_setup
from cluster.serve.app_config import (
    AppConfig,
    AttentionSpec,
    Resources,
    decode,
    default_model,
    group_scaling,
    resolve_groups,
)
from cluster.serve.deployments import Attention, ExpertGroup
from cluster.serve.frontend import Frontend
from mixtral.checkpoint import Checkpoint
from protos.shard_access import message_bytes_for

# The proxy routes both services' calls to the Frontend (Generate; Check, List, Watch) and adds
# server reflection itself (Serve's grpc_options.enable_reflection, on by default).
GRPC_SERVICERS = ["cluster.api.grpc_register.add_generation_servicer", "cluster.api.grpc_register.add_health_servicer"]
POLICY = "cluster.serve.autoscale_policy:AppPolicy"
PREFIX_ROUTER = "cluster.serve.prefix_router:PrefixAffinityRouter"
# Serve's throughput settings (its performance guide's; Ray 2.60 still defaults to 1): user
# code and handle routing on the replica's own event loop, not on threads of their own.
# Every token crosses two streaming handles (Attention -> Frontend -> proxy), and each item
# paid two hand-offs between threads (on the app_load bench the gain was within its
# run-to-run spread; docs/benchmarks.md).
# Replicas get them through their runtime_env; proxies and the controller read them from
# the environment Ray starts with (RAY_ENV).
SERVE_FLAGS = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
# The environment Ray itself starts with (`moe-serve up` sets it for a local cluster, the
# Helm chart for every pod). Ray starts its workers at nice 15, below its own processes and
# anything else on the machine; here the workers are the server's data path (each token
# crosses the Attention and expert processes several times per step), so they run at the
# ordinary priority (docs/benchmarks.md, served through Ray Serve). Every proxy runs
# cluster/serve/proxy_setup.py as it starts: the gRPC front door binds the app's host.
RAY_ENV = {**SERVE_FLAGS, "RAY_worker_niceness": "0",
           "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": proxy_setup.CALLBACK}
GRPC_MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"       # the gRPC proxy's message cap


def set_ray_env(cfg: AppConfig | None = None) -> None:
    """Before a local Ray starts: RAY_ENV for every process it starts, unless already set;
    and from the app's config, the host the gRPC proxy binds (http_host) and the largest
    message it takes (limits.max_body_bytes, as for an HTTP body; Serve's default is 2 GiB)."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    if cfg is not None:
        os.environ[proxy_setup.GRPC_HOST_ENV] = cfg.http_host
        os.environ[GRPC_MAX_MESSAGE_ENV] = str(cfg.limits.max_body_bytes)


def _actor_options(r: Resources | None = None) -> dict:
    opts = {"runtime_env": {"env_vars": dict(SERVE_FLAGS)}}
    if r is None:
        return {**opts, "num_cpus": 0}
    return {**opts, "num_gpus": r.num_gpus, "num_cpus": r.num_cpus, "resources": dict(r.resources)}


def _replicas(cfg: AppConfig, initial: int, lo: int, hi: int) -> dict:
    """Fixed replicas, or bounds for the app policy. Serve's own delays and factors stay
    neutral: AppPolicy applies the configured delays itself (and is tested doing so)."""
    if not cfg.autoscaling.enabled:
        return {"num_replicas": initial}
    a = cfg.autoscaling
    return {"num_replicas": "auto", "autoscaling_config": {
        "min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, min(hi, initial)),
        "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
        "metrics_interval_s": a.metrics_interval_s, "look_back_period_s": a.look_back_period_s}}


def _routing(a: AttentionSpec) -> dict:
    """The Attention handle's request router: by prompt prefix, or Serve's default."""
    r = a.prefix_routing
    if not r.enabled:
        return {}
    return {"request_router_config": RequestRouterConfig(
        request_router_class=PREFIX_ROUTER,
        request_router_kwargs={"block_size": a.engine.block_size, "blocks": r.blocks,
                               "max_imbalance": r.max_imbalance})}


def build_app(cfg: AppConfig, model: str) -> Application:
    """The app; ConfigError where the config cannot serve (no API key beyond loopback, say)."""
    mc = Checkpoint(model).config
    groups = resolve_groups(cfg, mc.num_local_experts)
    keys = ApiKeys.resolve(cfg.api_keys)
    require_keys(cfg.http_host, keys)
    directory = f"{cfg.name}-endpoints"
    telemetry = cfg.telemetry
    a, s = cfg.attention, cfg.autoscaling.attention
    # Both ends of an expert RPC cap messages at what the largest step can send.
    wire = {"tls": cfg.expert_tls, "max_message_bytes": message_bytes_for(
        mc.hidden_size, a.engine.max_batched_tokens, mc.num_experts_per_tok)}
    experts = []
    for g, spec in enumerate(groups):
        gs = group_scaling(cfg, spec)
        experts.append(serve.deployment(
            ExpertGroup, name=f"{GROUP_PREFIX}{g}", max_ongoing_requests=spec.max_ongoing_requests,
            ray_actor_options=_actor_options(spec), graceful_shutdown_timeout_s=30, health_check_period_s=5,
            **_replicas(cfg, spec.replicas, gs.min_replicas, gs.max_replicas),
        ).bind(model, g, spec, cfg.expert_device, cfg.expert_dtype, directory, telemetry, **wire))
    attention = serve.deployment(
        Attention, name=ATTENTION, max_ongoing_requests=a.max_ongoing_requests,
        max_queued_requests=a.max_queued_requests, ray_actor_options=_actor_options(a),
        graceful_shutdown_timeout_s=60, **_replicas(cfg, a.replicas, s.min_replicas, s.max_replicas),
        **_routing(a),
    ).bind(model, a.engine, groups, directory, telemetry, experts, expert_wait_s=a.expert_wait_s,
           expert_timeout_s=a.expert_timeout_s, **wire)
    max_len = a.engine.max_model_len_for(mc)
    # The proxies' own queue for the front door: past it they answer 429 + Retry-After themselves.
    return serve.deployment(Frontend, name=FRONTEND, num_replicas=1, max_ongoing_requests=1000,
                            max_queued_requests=1000, ray_actor_options=_actor_options(),
                            backpressure_config={"status_code": 429, "retry_after_s": cfg.limits.retry_after_s}
                            ).bind(attention, model, cfg.model_name or model.rstrip("/").split("/")[-1], max_len,
                                   directory, telemetry, keys, cfg.limits)


def serve_options(cfg: AppConfig) -> dict:
    """serve.start's proxies: OpenAI HTTP and the gRPC Generation service."""
    return {"http_options": {"host": cfg.http_host, "port": cfg.http_port},
            "grpc_options": {"port": cfg.grpc_port, "grpc_servicer_functions": GRPC_SERVICERS}}


def serve_config(cfg: AppConfig, model: str) -> dict:
    """The Serve config (as `serve deploy` and KubeRay's serveConfigV2 take it) for this app."""
    args = msgspec.to_builtins(cfg)
    args["model"] = model
    app = {"name": cfg.name, "route_prefix": "/", "import_path": "cluster.serve.builder:app_builder", "args": args}
    if cfg.autoscaling.enabled:
        app["autoscaling_policy"] = {"policy_function": POLICY, "policy_kwargs": {"config": args}}
    return {**serve_options(cfg), "applications": [app]}


def deploy(cfg: AppConfig, model: str, timeout_s: float = 300.0) -> None:
    """Deploy on the connected Ray cluster and wait until the app runs; a failed deploy raises."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(cfg, model)
    client = serve_start(http_options=config["http_options"], grpc_options=config["grpc_options"])
    client.deploy_apps(ServeDeploySchema(**{"applications": config["applications"]}))
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(cfg.name)
        status = app.status if app else "NOT_STARTED"
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED" or time.monotonic() > deadline:
            details = app.message if app else ""
            for name, d in (app.deployments.items() if app else []):
                if d.message:
                    details += f"\n  {name}: {d.message}"
            raise RuntimeError(f"application {cfg.name} did not start ({status}): {details}")
        time.sleep(0.5)


def app_builder(args: dict) -> Application:
    """Serve's config-file entry (`import_path: cluster.serve.builder:app_builder`, as the Helm chart's
    serveConfigV2 uses it): `args` is the same mapping the YAML config file holds."""
    cfg = decode(args, "serve application args")
    return build_app(cfg, cfg.model or str(default_model()))
