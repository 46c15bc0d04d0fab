"""The front door: OpenAI-compatible HTTP and the gRPC Generation service, on Ray Serve.

Text becomes token ids here (the tokenizer needs no model), requests are checked here
(API keys, limits), and tokens stream back from an Attention replica through a
DeploymentHandle.

What the handle would hide, the front door answers itself, at once: with no attention
replica alive (none has beaten to the directory within its lease) a request gets 503 and
Retry-After instead of waiting in the handle's queue until Serve has started a new one;
a full queue (Serve's max_queued_requests) is 429; a replica that dies mid-stream ends
the stream with an error event (gRPC: UNAVAILABLE) instead of silence. /ready reports the
directory's view: an attention replica alive that reaches every expert group, each with a
live replica; the gRPC health service (Check, List, Watch: cluster/api/grpc_health.py)
says the same.
"""

import asyncio
import logging
import os
from typing import AsyncIterator

import grpc
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from grpc_health.v1.health_pb2 import HealthCheckResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from attention_service.async_engine import Delta
from attention_service.errors import Overloaded, Unavailable
from attention_service.sampling_params import SamplingParams
from attention_service.tokenizer import Tokenizer
from cluster.api import grpc_api, grpc_health
from cluster.api.access import ApiKeys
from cluster.api.backend import Backend
from cluster.api.limits import RequestLimits
from cluster.api.openai_api import add_openai_routes
from cluster.api.request_telemetry import observed
from cluster.observe import metrics_gather, telemetry
from cluster.observe.dashboard import add_dashboard_routes
from cluster.observe.telemetry import TelemetrySpec
from cluster.serve.directory import get_directory

log = logging.getLogger("ray.serve")
app = FastAPI(title="moe-serve")
_replica: dict = {}


def current_backend() -> Backend:
    # A named module function travels by reference when Serve ships the app to a replica,
    # so it reads that replica's module state (a lambda would carry a copy of the dict).
    return _replica["backend"]


async def gather_families() -> dict:
    """Every process's metrics: this one's and those the directory lists."""
    targets = await _replica["directory"].metrics_targets.remote()
    return await metrics_gather.gather((f"frontend-{os.getpid()}", telemetry.get().text()), targets)


async def gather_metrics() -> tuple[dict, dict]:
    """Every process's metrics, and the autoscaling policy's last decisions (for the dashboard)."""
    return await gather_families(), await _replica["directory"].scaling.remote()


add_openai_routes(app, current_backend)
add_dashboard_routes(app, gather_metrics)


@app.get("/metrics", response_class=PlainTextResponse)
async def metrics() -> str:
    """The whole app's metrics in Prometheus text format; each series has a `process` label."""
    return metrics_gather.render(await gather_families())


class ServeBackend:
    """Streams from the Attention deployment; closing the stream cancels the request there."""

    def __init__(self, attention: DeploymentHandle, tokenizer: Tokenizer, model_name: str, max_model_len: int,
                 directory=None, api_keys: ApiKeys = ApiKeys(), limits: RequestLimits = RequestLimits()):
        self.attention = attention.options(stream=True)
        self.tokenizer, self.model_name, self.max_model_len = tokenizer, model_name, max_model_len
        self.directory, self.api_keys, self.limits = directory, api_keys, limits
        self.readiness: dict | None = None       # the directory's last word (None: not heard yet)
        self._watch: asyncio.Task | None = None

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        return observed(lambda trace: self._stream(prompt_ids, params, trace), len(prompt_ids), self.model_name)

    async def _stream(self, prompt_ids: list[int], params: SamplingParams, trace: dict) -> AsyncIterator[Delta]:
        self._ensure_watching()
        if self.readiness is not None and not self.readiness["attention"]:
            raise Unavailable("no attention replica is running; Serve is starting one", self.limits.retry_after_s)
        gen = self.attention.generate.remote(prompt_ids, params, trace or None)
        done = False
        left = params.n                # the stream ends after every choice's last delta
        try:
            first = await self._first(gen)
            left -= first.finish_reason is not None
            done = left == 0
            yield first
            if not done:
                async for delta in gen:
                    left -= delta.finish_reason is not None
                    done = left == 0
                    yield delta
        except BackPressureError:
            raise Overloaded("server busy: the queue for attention replicas is full; retry later",
                             self.limits.retry_after_s) from None
        except RayActorError as e:
            raise Unavailable(f"the attention replica serving this request died ({type(e).__name__})",
                              self.limits.retry_after_s) from None
        finally:
            if not done:
                gen.cancel()

    async def _first(self, gen) -> Delta:
        """The first delta; Unavailable if meanwhile the directory has no attention replica alive.
        (A request the handle queued for a replica that died would otherwise wait, unanswered,
        until Serve has started and loaded a new one.)"""
        first = asyncio.ensure_future(anext(gen))
        try:
            while not (await asyncio.wait({first}, timeout=1.0))[0]:
                if self.readiness is not None and not self.readiness["attention"]:
                    raise Unavailable("no attention replica is running; Serve is starting one",
                                      self.limits.retry_after_s)
            return first.result()
        finally:
            first.cancel()

    async def ready(self) -> tuple[bool, dict]:
        """Ready: an attention replica beat lately and reaches a replica of every group, and every
        group has a replica whose lease in the directory is current (a replica that stopped
        renewing counts as gone even before the attention replica has dropped it)."""
        self._ensure_watching()
        r = await asyncio.wait_for(self.directory.readiness.remote(), 5.0)
        self.readiness = r
        reach = list(r["attention"].values())
        reached = [max(c) for c in zip(*reach)] if reach else []
        missing = [g for g, n in enumerate(reached) if not n or not r["groups"].get(g)]
        ok = any(all(live) for live in reach) and not missing
        detail = {"attention_replicas": len(reach), "expert_replicas": reached,
                  "registered_expert_replicas": {str(g): n for g, n in sorted(r["groups"].items())}}
        if missing:
            detail["groups_without_replica"] = missing
        return ok, detail

    def _ensure_watching(self) -> None:
        if self.directory is not None and (self._watch is None or self._watch.done()):
            self._watch = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        """Keep the directory's view at most a second old, so a request never waits on a dead handle."""
        while True:
            try:
                self.readiness = await asyncio.wait_for(self.directory.readiness.remote(), 5.0)
            except Exception:
                log.warning("front door: endpoint directory unreachable", exc_info=True)
                self.readiness = None            # unknown: let requests try
            await asyncio.sleep(1.0)


@serve.ingress(app)
class Frontend:
    def __init__(self, attention: DeploymentHandle, model: str, model_name: str, max_model_len: int,
                 directory: str, telemetry_spec: TelemetrySpec = TelemetrySpec(), api_keys: ApiKeys = ApiKeys(),
                 limits: RequestLimits = RequestLimits()):
        telemetry.init("frontend", telemetry_spec)
        d = get_directory(directory)
        self.backend = ServeBackend(attention, Tokenizer.from_checkpoint(model), model_name, max_model_len, d,
                                    api_keys, limits)
        _replica["backend"] = self.backend
        _replica["directory"] = d

    async def Generate(self, request, grpc_context=None):
        """gRPC Generation.Generate, called by Serve's gRPC proxy: a stream of GenerateResponse."""
        try:
            grpc_api.authorize(self.backend, grpc_context.invocation_metadata() if grpc_context else ())
            async for response in grpc_api.generate(self.backend, request):
                yield response
        except grpc_api.RpcError as e:
            # Serve's proxy keeps a status set on the context before the method raises.
            if grpc_context is not None:
                grpc_context.set_code(e.code)
                grpc_context.set_details(e.message)
                if e.retry_after_s is not None:
                    grpc_context.set_trailing_metadata(list(e.trailing_metadata()))
            raise

    async def Check(self, request, grpc_context=None):
        """gRPC grpc.health.v1.Health/Check, called by Serve's gRPC proxy (no API key: probes send none)."""
        status = await grpc_health.status(self.backend, request.service)
        if status == grpc_health.SERVICE_UNKNOWN:
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(grpc_health.unknown(request.service))
            raise grpc_api.RpcError(grpc.StatusCode.NOT_FOUND, grpc_health.unknown(request.service))
        return HealthCheckResponse(status=status)

    async def List(self, request, grpc_context=None):
        """gRPC grpc.health.v1.Health/List: every name the front door reports."""
        return await grpc_health.statuses(self.backend)

    async def Watch(self, request, grpc_context=None):
        """gRPC grpc.health.v1.Health/Watch: the status now, then each change."""
        async for response in grpc_health.watch(lambda: self.backend, request.service):
            yield response
