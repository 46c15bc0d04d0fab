"""The front door: OpenAI-compatible HTTP and the gRPC Generation service, on Ray Serve.

Text becomes token ids here (the tokenizer needs no model), requests are checked here,
and tokens stream back from an Attention replica through a DeploymentHandle.
"""

import os
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from attention_service.async_engine import Delta
from attention_service.sampling_params import SamplingParams
from attention_service.tokenizer import Tokenizer
from cluster.api import grpc_api
from cluster.api.backend import Backend
from cluster.api.openai_api import add_openai_routes
from cluster.api.request_telemetry import observed
from cluster.observe import metrics_gather, telemetry
from cluster.observe.dashboard import add_dashboard_routes
from cluster.observe.telemetry import TelemetrySpec
from cluster.serve.directory import get_directory

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

    def __init__(self, attention: DeploymentHandle, tokenizer: Tokenizer, model_name: str, max_model_len: int):
        self.attention = attention.options(stream=True)
        self.tokenizer, self.model_name, self.max_model_len = tokenizer, model_name, max_model_len

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        return observed(lambda trace: self._stream(prompt_ids, params, trace), len(prompt_ids), self.model_name)

    async def _stream(self, prompt_ids: list[int], params: SamplingParams, trace: dict) -> AsyncIterator[Delta]:
        gen = self.attention.generate.remote(prompt_ids, params, trace or None)
        done = False
        try:
            async for delta in gen:
                done = delta.finish_reason is not None
                yield delta
        finally:
            if not done:
                gen.cancel()


@serve.ingress(app)
class Frontend:
    def __init__(self, attention: DeploymentHandle, model: str, model_name: str, max_model_len: int,
                 directory: str, telemetry_spec: TelemetrySpec = TelemetrySpec()):
        telemetry.init("frontend", telemetry_spec)
        self.backend = ServeBackend(attention, Tokenizer.from_checkpoint(model), model_name, max_model_len)
        _replica["backend"] = self.backend
        _replica["directory"] = get_directory(directory)

    async def Generate(self, request, grpc_context=None):
        """gRPC Generation.Generate, called by Serve's gRPC proxy: a stream of GenerateResponse."""
        try:
            async for response in grpc_api.generate(self.backend, request):
                yield response
        except grpc_api.RpcError as e:
            # Serve's proxy keeps a status set on the context before the method raises.
            if grpc_context is not None:
                grpc_context.set_code(e.code)
                grpc_context.set_details(e.message)
            raise
