"""The application's configuration: one YAML file, decoded into frozen structs.

    model: /models/mixtral-8x7b          # omit for the embedded tiny default
    attention: {replicas: 1, num_gpus: 1, engine: {max_batched_tokens: 4096}}
    expert_groups:                       # or `groups: 4` to deal whole experts round-robin
      - {experts: [0, 1], replicas: 2, num_gpus: 1}
      - {experts: [2, 3]}

A field that does not exist, or has the wrong type, is an error that names it (with its
path in the file); the same structs decode the Helm chart's serveConfigV2 arguments.
"""

import logging
from pathlib import Path
from typing import Any

import msgspec
import yaml

from attention_service.config import EngineConfig
from cluster.api.limits import RequestLimits
from cluster.observe.telemetry import TelemetrySpec
from mixtral.checkpoint import EXPERT_DTYPES
from mixtral.config import CACHE, ConfigError, preset
from protos.shard_access import ShardTLS
from router.dispatch import split_experts


class Resources(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a deployment's replicas may run."""

    num_gpus: float = 0
    num_cpus: float = 1
    # Custom node resources, e.g. {expert_node: 1}, to keep attention and experts apart.
    resources: dict[str, float] = {}


def _check_scaling(lo: int, hi: int, up: float, down: float, target_name: str, target: float,
                   hysteresis: float) -> None:
    """What the policy divides by and bounds with must make sense, or it fails inside Serve."""
    if lo < 1 or hi < lo:
        raise ConfigError(f"need 1 <= min_replicas <= max_replicas, got {lo} and {hi}")
    if up < 0 or down < 0:
        raise ConfigError("upscale_delay_s and downscale_delay_s must not be negative")
    if not target > 0:
        raise ConfigError(f"{target_name} must be positive, got {target}")
    if not 0 <= hysteresis < 1:
        raise ConfigError(f"hysteresis must be in [0, 1), got {hysteresis}")


class GroupScaling(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How an expert group's replica count follows the routing load it gets."""

    min_replicas: int = 1
    max_replicas: int = 4
    # Routed (token, expert) pairs per second, summed over the group's layers, that one
    # replica should carry. The figure to tune: `moe-serve tune` proposes it from a recording.
    target_tokens_per_s: float = 2000.0
    # Scale down only once demand fits the smaller count with this much room to spare, so
    # a load near a boundary does not flap between two counts.
    hysteresis: float = 0.2
    # Demand counts only what attention could route; replicas busier than this add one
    # even when the counted demand does not ask for it (the backlog is invisible to it).
    max_busy: float = 0.85
    # How long a wish must hold before it is acted on: quick to add, slow to remove.
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0

    def __post_init__(self) -> None:
        _check_scaling(self.min_replicas, self.max_replicas, self.upscale_delay_s, self.downscale_delay_s,
                       "target_tokens_per_s", self.target_tokens_per_s, self.hysteresis)


class AttentionScaling(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Attention replicas follow requests in flight and KV cache use."""

    min_replicas: int = 1
    max_replicas: int = 1
    # Running + waiting requests one replica should hold.
    target_requests: float = 64.0
    # Add a replica when the mean KV cache use is above this, whatever the request count.
    max_kv_usage: float = 0.9
    hysteresis: float = 0.2
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0

    def __post_init__(self) -> None:
        _check_scaling(self.min_replicas, self.max_replicas, self.upscale_delay_s, self.downscale_delay_s,
                       "target_requests", self.target_requests, self.hysteresis)


class AutoscalingSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Off: every deployment keeps its `replicas`.
    enabled: bool = True
    # Every expert group's settings, unless the group has its own `scaling`.
    experts: GroupScaling = GroupScaling()
    attention: AttentionScaling = AttentionScaling()
    # How often replicas report load to Serve's controller, and the window it averages over.
    metrics_interval_s: float = 1.0
    look_back_period_s: float = 5.0


class PrefixRouting(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which Attention replica takes a request (cluster/serve/prefix_router.py)."""

    # On: requests that open alike go to the same replica, where that prefix's KV is cached.
    # Off: the least loaded of two random replicas, Serve's default.
    enabled: bool = True
    # Leading full KV blocks that name a request for routing: longer sees deeper into the
    # conversation, shorter groups more requests together.
    blocks: int = 4
    # Requests more on the preferred replica than on the least loaded before load wins.
    max_imbalance: int = 8

    def __post_init__(self) -> None:
        if self.blocks < 1 or self.max_imbalance < 1:
            raise ConfigError("prefix_routing.blocks and max_imbalance must be at least 1")


class AttentionSpec(Resources, frozen=True, forbid_unknown_fields=True):
    replicas: int = 1
    # One engine batches every request its replica holds: size to the engine, not Serve's default of 5.
    max_ongoing_requests: int = 256
    # Requests the front door holds for attention replicas once they all hold
    # max_ongoing_requests (Serve's max_queued_requests); the next get 429 with Retry-After
    # instead of a wait without bound.
    max_queued_requests: int = 64
    # How long a request waits for an expert group with no live replica to get one back
    # (Serve replaces a dead replica in seconds) before it fails with 503 and Retry-After.
    expert_wait_s: float = 30.0
    # Deadline of one expert RPC; a replica that misses it is set aside and its rows go to
    # another replica of the group (a hung shard costs this long once).
    expert_timeout_s: float = 30.0
    engine: EngineConfig = EngineConfig()
    prefix_routing: PrefixRouting = PrefixRouting()

    def __post_init__(self) -> None:
        if self.max_queued_requests < 0:
            raise ConfigError(f"attention.max_queued_requests must not be negative, got {self.max_queued_requests}")
        if not (self.expert_wait_s >= 0 and self.expert_timeout_s > 0):
            raise ConfigError("attention.expert_wait_s must be >= 0 and expert_timeout_s > 0")


class GroupSpec(Resources, frozen=True, forbid_unknown_fields=True):
    experts: list[int] = []
    # Unset: these experts in every layer.
    layers: list[int] | None = None
    # Replicas at start; with autoscaling on, the policy moves it within the group's bounds.
    replicas: int = 1
    # This group's own autoscaling settings; unset: autoscaling.experts.
    scaling: GroupScaling | None = None
    # Batches in flight per replica; the engine pipelines micro-batches of every layer.
    max_ongoing_requests: int = 64


class AppConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str | None = None
    # The name clients use (OpenAI `model`); default: the model folder's name.
    model_name: str | None = None
    name: str = "moe-serve"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 9000
    # Used when expert_groups is empty: whole experts dealt round-robin into this many groups.
    groups: int = 2
    expert_groups: list[GroupSpec] = []
    expert_device: str = "cpu"
    # auto: the checkpoint's on CPU, bfloat16 on GPU. fp8: e4m3 weights with per-channel
    # scales, quantised at load (half of bf16's bytes; rows still travel in bf16).
    expert_dtype: str = "auto"
    attention: AttentionSpec = AttentionSpec()
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    telemetry: TelemetrySpec = TelemetrySpec()
    # Keys for the front door: HTTP `Authorization: Bearer KEY`, gRPC `authorization`
    # metadata. MOE_SERVE_API_KEY (comma-separated) adds to them and keeps them out of the
    # config, which Serve shows to anyone who can read its status. Required when
    # http_host is not a loopback address.
    api_keys: list[str] = []
    # What one request may ask: body size, default max_tokens, stop conditions, Retry-After.
    limits: RequestLimits = RequestLimits()
    # TLS between attention and expert shards (mTLS by default): PEM files on every node.
    # Unset: plaintext, though shards still take calls only with the app's own token.
    expert_tls: ShardTLS | None = None

    def __post_init__(self) -> None:
        if self.expert_dtype not in ("auto", *EXPERT_DTYPES):
            raise ConfigError(f"expert_dtype must be one of auto, {', '.join(EXPERT_DTYPES)}; "
                              f"got {self.expert_dtype!r}")
        if self.groups < 1:
            raise ConfigError(f"groups must be at least 1, got {self.groups}")
        for i, g in enumerate(self.expert_groups):
            if not g.experts:
                raise ConfigError(f"expert_groups[{i}].experts is empty")
            if g.replicas < 1:
                raise ConfigError(f"expert_groups[{i}].replicas must be at least 1")
        if self.attention.replicas < 1:
            raise ConfigError("attention.replicas must be at least 1")


def decode(raw: Any, source: str = "config") -> AppConfig:
    try:
        return msgspec.convert(raw or {}, AppConfig)
    except msgspec.ValidationError as e:
        # e.g. "Object contains unknown field `replica` - at `$.attention`"
        raise ConfigError(f"{source}: {e}") from None


def load(path: str | Path) -> AppConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    return decode(raw, str(path))


def group_scaling(cfg: AppConfig, spec: GroupSpec) -> GroupScaling:
    return spec.scaling or cfg.autoscaling.experts


def resolve_groups(cfg: AppConfig, num_experts: int) -> list[GroupSpec]:
    """The expert groups to deploy: as listed, or `groups` round-robin groups of whole experts."""
    if cfg.expert_groups:
        return list(cfg.expert_groups)
    if not 1 <= cfg.groups <= num_experts:
        raise ConfigError(f"groups must be in [1, {num_experts}], got {cfg.groups}")
    return [GroupSpec(experts=e) for e in split_experts(num_experts, cfg.groups)]


def default_model() -> Path:
    """The embedded default: a tiny random-weight Mixtral with the real tokenizer, made on first use."""
    from mixtral.random_checkpoint import write_random_checkpoint

    out = CACHE / "models" / "tiny"
    if not (out / "config.json").exists():
        logging.getLogger("moe-serve").info("making the default tiny checkpoint in %s", out)
        write_random_checkpoint(preset("tiny"), out)
    return out
