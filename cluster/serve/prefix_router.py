"""Cache-aware routing across Attention replicas: send a request where its prefix likely is.

Serve's handle asks a request router which Attention replica takes each request. This one
names a request by its leading full KV blocks (the same chained block names the engine's
prefix cache uses, from the prompt ids the handle call carries) and ranks the replicas by
rendezvous hashing on that name: requests that open with the same system prompt or the
same conversation so far go to the same replica, where their blocks are cached, and only
the keys of a replica that comes or goes move. Load still counts: when the preferred
replica holds `max_imbalance` more requests than the least loaded one, the request goes to
the least loaded instead, and a prompt shorter than one block is simply balanced.

Each decision is counted (`moe_serve.router.prefix_routes`, by decision) through the
OpenTelemetry API, in the process that routes: the front door.
"""

import hashlib
import logging

from opentelemetry import metrics
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from attention_service.block_manager import block_hash

log = logging.getLogger("ray.serve")


def prefix_key(prompt_ids: list[int], block_size: int, blocks: int) -> bytes:
    """The name of the prompt's first `blocks` full blocks (fewer if it is shorter); b"" if none."""
    key = b""
    for i in range(min(blocks, len(prompt_ids) // block_size)):
        key = block_hash(key, prompt_ids[i * block_size:(i + 1) * block_size])
    return key


def rendezvous(key: bytes, replicas: list[str]) -> list[str]:
    """Replica ids, most preferred for this key first (highest random weight)."""
    def weight(r: str) -> bytes:
        return hashlib.blake2b(key + r.encode(), digest_size=8).digest()
    return sorted(replicas, key=weight, reverse=True)


def choose(key: bytes, queue_lens: dict[str, int], max_imbalance: int) -> tuple[str | None, str]:
    """-> (the preferred replica or None to balance, the decision's name)."""
    if not key or len(queue_lens) < 2:
        return None, "balanced"
    best = rendezvous(key, list(queue_lens))[0]
    if queue_lens[best] - min(queue_lens.values()) >= max_imbalance:
        return None, "balanced"
    return best, "affinity"


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, block_size: int = 16, blocks: int = 4, max_imbalance: int = 8, **_) -> None:
        self.block_size, self.blocks, self.max_imbalance = block_size, blocks, max_imbalance
        # Made here, in the routing process once its telemetry is up: an instrument made when
        # Serve loads this module there was seen to stay unbound to that process's provider.
        self.routes = metrics.get_meter(__name__).create_counter(
            "moe_serve.router.prefix_routes", "{request}",
            "Attention replica choices: to the prefix's replica (affinity), to the least loaded instead (balanced)")

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        args = pending_request.args if pending_request is not None else []
        prompt_ids = args[0] if args and isinstance(args[0], list) else []
        key = prefix_key(prompt_ids, self.block_size, self.blocks)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        lens = {rid: cache.get(r.replica_id) or 0 for rid, r in by_id.items()}
        best, decision = choose(key, lens, self.max_imbalance)
        self.routes.add(1, {"decision": decision})
        if best is None:
            return [candidate_replicas]              # the least loaded of them, as Serve judges it
        return [[by_id[best]], [r for rid, r in by_id.items() if rid != best]]
