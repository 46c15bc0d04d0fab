"""The application's configuration: one YAML file, decoded into frozen structs.

    model: /models/mixtral-8x7b          # omit for the embedded tiny default
    attention: {replicas: 1, num_gpus: 1, engine: {max_batched_tokens: 4096}}
    expert_groups:                       # or `groups: 4` to deal whole experts round-robin
      - {experts: [0, 1], replicas: 2, num_gpus: 1}
      - {experts: [2, 3]}

A field that does not exist, or has the wrong type, is an error that names it (with its
path in the file); the same structs decode the Helm chart's serveConfigV2 arguments.
"""

from pathlib import Path
from typing import Any

import msgspec
import yaml

from cluster.config import ConfigError, EngineConfig


class Resources(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a deployment's replicas may run."""

    num_gpus: float = 0
    num_cpus: float = 1
    # Custom node resources, e.g. {expert_node: 1}, to keep attention and experts apart.
    resources: dict[str, float] = {}


class AttentionSpec(Resources, frozen=True, forbid_unknown_fields=True):
    replicas: int = 1
    # One engine batches every request its replica holds: size to the engine, not Serve's default of 5.
    max_ongoing_requests: int = 256
    engine: EngineConfig = EngineConfig()


class GroupSpec(Resources, frozen=True, forbid_unknown_fields=True):
    experts: list[int] = []
    # Unset: these experts in every layer.
    layers: list[int] | None = None
    replicas: int = 1
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
    expert_dtype: str = "auto"
    attention: AttentionSpec = AttentionSpec()

    def __post_init__(self) -> None:
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


def resolve_groups(cfg: AppConfig, num_experts: int) -> list[GroupSpec]:
    """The expert groups to deploy: as listed, or `groups` round-robin groups of whole experts."""
    if cfg.expert_groups:
        return list(cfg.expert_groups)
    if not 1 <= cfg.groups <= num_experts:
        raise ConfigError(f"groups must be in [1, {num_experts}], got {cfg.groups}")
    return [GroupSpec(experts=list(range(g, num_experts, cfg.groups))) for g in range(cfg.groups)]
