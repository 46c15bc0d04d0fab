"""One request as the front door sees it: its span and its GenAI metrics.

Time to first token counts from the request's arrival at the front door to its first
token; time per output token is the mean gap after that; both as the GenAI semantic
conventions define them for a server.
"""

import time
from typing import AsyncIterator, Callable

from opentelemetry import trace

from attention_service.async_engine import Delta
from attention_service.errors import Overloaded, RequestError, Unavailable
from cluster.observe import telemetry


async def observed(open_stream: Callable[[dict], AsyncIterator[Delta]], prompt_tokens: int, model: str
                   ) -> AsyncIterator[Delta]:
    """Wrap a request's delta stream: `open_stream(trace_headers)` starts it under the request's span."""
    tel = telemetry.get()
    attrs = {"gen_ai.request.model": model, "gen_ai.operation.name": "text_completion"}
    start = time.perf_counter()
    first = last = None
    tokens, outcome = 0, "abort"
    # Not made the current span: an async generator's context would leak into its caller's
    # between yields. Its context travels explicitly, as the headers handed downstream.
    span = tel.tracer.start_span("moe_serve.request", kind=trace.SpanKind.SERVER,
                                 attributes={**attrs, "gen_ai.usage.input_tokens": prompt_tokens})
    inner = open_stream(telemetry.inject(trace.set_span_in_context(span)))
    try:
        async for delta in inner:
            n = len(delta.token_ids)
            if n:
                last = time.perf_counter()
                first = first or last
                tokens += n
            if delta.finish_reason is not None:
                outcome = delta.finish_reason
            yield delta
    except BaseException as e:
        # Input refused before any work is the client's error, not the server's; a full queue
        # and nothing to serve with are neither, and an operator wants them apart.
        outcome = ("rejected" if isinstance(e, RequestError) else "overloaded" if isinstance(e, Overloaded)
                   else "unavailable" if isinstance(e, Unavailable) else "error" if isinstance(e, Exception)
                   else "abort")
        span.set_status(trace.StatusCode.ERROR, type(e).__name__)
        raise
    finally:
        await inner.aclose()        # leaving early must cancel the request upstream now
        end = time.perf_counter()
        span.set_attribute("gen_ai.usage.output_tokens", tokens)
        done = {**attrs, "error.type": outcome} if outcome == "error" else attrs
        tel.duration.record(end - start, done)
        tel.requests.add(1, {"outcome": outcome})
        tel.token_usage.record(prompt_tokens, {**attrs, "gen_ai.token.type": "input"})
        tel.token_usage.record(tokens, {**attrs, "gen_ai.token.type": "output"})
        if first is not None:
            tel.ttft.record(first - start, attrs)
            if tokens > 1:
                tel.tpot.record((last - first) / (tokens - 1), attrs)
        span.end()
