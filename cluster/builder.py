"""The one place the Serve application is assembled: every `serve.deployment(...).bind(...)`."""

import msgspec
from ray import serve
from ray.serve import Application

from cluster.app_config import AppConfig, Resources, resolve_groups
from cluster.checkpoint import Checkpoint
from cluster.deployments import Attention, ExpertGroup
from cluster.frontend import Frontend

GRPC_SERVICERS = ["protos.generation_pb2_grpc.add_GenerationServicer_to_server"]


def _actor_options(r: Resources) -> dict:
    return {"num_gpus": r.num_gpus, "num_cpus": r.num_cpus, "resources": dict(r.resources)}


def build_app(cfg: AppConfig, model: str) -> Application:
    mc = Checkpoint(model).config
    groups = resolve_groups(cfg, mc.num_local_experts)
    directory = f"{cfg.name}-endpoints"
    experts = [
        serve.deployment(ExpertGroup, name=f"ExpertGroup-{g}", num_replicas=spec.replicas,
                         max_ongoing_requests=spec.max_ongoing_requests, ray_actor_options=_actor_options(spec),
                         graceful_shutdown_timeout_s=30, health_check_period_s=5)
        .bind(model, g, spec.experts, spec.layers, cfg.expert_device, cfg.expert_dtype, directory)
        for g, spec in enumerate(groups)]
    a = cfg.attention
    attention = serve.deployment(
        Attention, name="Attention", num_replicas=a.replicas, max_ongoing_requests=a.max_ongoing_requests,
        ray_actor_options=_actor_options(a), graceful_shutdown_timeout_s=60,
    ).bind(model, msgspec.to_builtins(a.engine), [{"experts": s.experts, "layers": s.layers} for s in groups],
           directory, experts)
    max_len = min(a.engine.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    return serve.deployment(Frontend, name="Frontend", num_replicas=1, max_ongoing_requests=1000,
                            ray_actor_options={"num_cpus": 0}).bind(
        attention, model, cfg.model_name or model.rstrip("/").split("/")[-1], max_len)


def serve_options(cfg: AppConfig) -> dict:
    """serve.start's proxies: OpenAI HTTP and the gRPC Generation service."""
    return {"http_options": {"host": cfg.http_host, "port": cfg.http_port},
            "grpc_options": {"port": cfg.grpc_port, "grpc_servicer_functions": GRPC_SERVICERS}}


def app_builder(args: dict) -> Application:
    """Serve's config-file entry (`import_path: cluster.builder:app_builder`, as the Helm chart's
    serveConfigV2 uses it): `args` is the same mapping the YAML config file holds."""
    from cluster.app_config import decode

    cfg = decode(args, "serve application args")
    if not cfg.model:
        from cluster.cli import default_model
        model = str(default_model())
    else:
        model = cfg.model
    return build_app(cfg, model)
