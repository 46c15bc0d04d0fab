"""Fuzz the OpenAI front door: requests over its schema with every field bent, and raw garbage.

    python -m bench.fuzz_api [--examples 5000] [--seed 0]

Serves the tiny model (LocalBackend under a real uvicorn, as tests/test_fuzz_api.py does
with a few hundred cases) and sends `--examples` probes: JSON requests to
/v1/completions and /v1/chat/completions whose fields are valid, out of range, of the
wrong type, huge, non-finite or lone UTF-16 surrogates; bodies that are not JSON, cut
short, nested too deep or too large; wrong content types, methods and API keys. Prints
one line per status code, the count of 5xx (the target is 0: bad input is the client's
error), and whether the server still answers a valid request the same way afterwards.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from hypothesis import strategies as st

KEY = "fuzz-key"
MODEL = "tiny"
PATHS = ["/v1/completions", "/v1/chat/completions"]


@dataclass(frozen=True)
class Probe:
    method: str
    path: str
    body: bytes = b""
    headers: dict = field(default_factory=lambda: {"Content-Type": "application/json",
                                                   "Authorization": f"Bearer {KEY}"})


# Strings as a client could send them in JSON: any code point, lone surrogates included
# (json.dumps writes them as \\ud800 escapes, which json.loads reads back).
_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
_huge = st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, 2**64 + 5, -(2**63) - 1, 10**40])
_ints = st.one_of(st.integers(-3, 40), _huge)
_small_tokens = st.integers(1, 3)                       # valid max_tokens stay cheap to generate
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 3))
_anything = st.recursive(st.one_of(st.none(), st.booleans(), _ints, _floats, _text),
                         lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(_text, c, max_size=4)),
                         max_leaves=8)


def _field(valid):
    """Mostly a valid value, sometimes anything at all."""
    return st.one_of(valid, valid, valid, _anything)


_prompt = st.one_of(_text, st.lists(st.integers(-5, 32005), max_size=8), st.lists(_ints, max_size=4),
                    st.lists(_text, min_size=1, max_size=2), st.lists(st.lists(st.integers(0, 31999), max_size=4),
                                                                      min_size=1, max_size=2))
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"]),
                                  "content": st.one_of(_text, st.none(), _anything)})
_sampling = {
    "max_tokens": _field(_small_tokens), "temperature": _field(st.floats(0, 2)), "top_p": _field(st.floats(0.01, 1)),
    "top_k": _field(st.integers(-1, 50) | _huge), "seed": _field(st.integers(0, 2**64 - 1) | _huge),
    "stop": _field(st.one_of(_text, st.lists(_text, max_size=20))),
    "stop_token_ids": _field(st.lists(st.integers(-2, 32005) | _huge, max_size=70)),
    "ignore_eos": _field(st.booleans()), "stream": _field(st.booleans()),
    "stream_options": _field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "n": _field(st.integers(-1, 3) | _huge), "logprobs": _anything,
    "presence_penalty": _field(st.floats(-3, 3)), "frequency_penalty": _field(st.floats(-3, 3)),
    "repetition_penalty": _field(st.floats(-1, 12)), "min_p": _field(st.floats(-0.5, 1.5)),
    "logit_bias": _field(st.dictionaries(st.one_of(st.integers(-2, 32005).map(str), _text),
                                         st.floats(-150, 150) | st.just(float("nan")), max_size=4) | _anything),
    "unknown_field": _anything,
}


@st.composite
def openai_requests(draw) -> Probe:
    chat = draw(st.booleans())
    body = {"model": draw(st.one_of(st.just(MODEL), st.just(MODEL), _anything))}
    if chat:
        body["messages"] = draw(st.one_of(st.lists(_message, min_size=1, max_size=3), _anything))
        extra = {"tools": _anything, "tool_choice": _anything, "top_logprobs": _field(st.integers(0, 20)),
                 "response_format": _field(st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | _anything),
                 "max_completion_tokens": _field(_small_tokens)}
    else:
        body["prompt"] = draw(st.one_of(_prompt, _prompt, _anything))
        extra = {"echo": _anything, "suffix": _anything}
    for name, strategy in {**_sampling, **extra}.items():
        if draw(st.integers(0, 3)) == 0:
            body[name] = draw(strategy)
    body.setdefault("max_tokens", draw(_small_tokens))
    data = json.dumps(body, allow_nan=True).encode()      # ensure_ascii: surrogates travel as \\u escapes
    return Probe("POST", PATHS[chat], data)


@st.composite
def raw_requests(draw) -> Probe:
    """Bodies that are not the schema at all, and requests wrong in their headers or method."""
    path = draw(st.sampled_from(PATHS + ["/v1/models", "/health", "/ready", "/docs", "/openapi.json", "/nope"]))
    valid = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    body = draw(st.one_of(
        st.binary(max_size=64), st.just(valid[:draw(st.integers(0, len(valid)))]),
        st.just(b"[" * 100_000 + b"]" * 100_000), st.just(b'{"model": "tiny", "prompt": ' + b"9" * 5000 + b"}"),
        st.just(b'{"model": "tiny", "prompt": "' + b"a" * (5 << 20) + b'"}'),
        st.just(valid.replace(b"hi", b"\xff\xfe")), st.just(b"\xef\xbb\xbf" + valid)))
    headers = {"Content-Type": draw(st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "text/plain", "", "application/x-www-form-urlencoded",
         "multipart/form-data; boundary=x", "application/JSON"])),
        "Authorization": draw(st.sampled_from([f"Bearer {KEY}", f"Bearer {KEY}x", "", "Basic Zm9vOmJhcg==",
                                               f"bearer {KEY}", "Bearer"]))}
    method = draw(st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    return Probe(method, path, body, {k: v for k, v in headers.items() if v})


def probes():
    return st.one_of(openai_requests(), openai_requests(), raw_requests())


def send(base: str, probe: Probe, timeout: float = 60.0) -> tuple[int, bytes]:
    """One probe over a fresh connection -> (status, body)."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(probe.method, probe.path, body=probe.body or None, headers=probe.headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def server_error(status: int, body: bytes) -> str | None:
    """Why a reply counts as the server's failure: a 5xx, or an error event inside a 200 stream."""
    if status >= 500:
        return f"{status}: {body[:300]!r}"
    if status == 200 and b'"server_error"' in body:
        return f"200 with an error event: {body[:300]!r}"
    return None


def main(argv: list[str] | None = None) -> None:
    from hypothesis import HealthCheck, given, seed, settings

    from cluster.api.access import ApiKeys
    from cluster.api.backend import LocalBackend
    from cluster.api.limits import RequestLimits
    from cluster.api.openai_api import build_openai_app
    from cluster.serve.app_config import default_model
    from cluster.tools.harness import serving

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    backend = LocalBackend.from_checkpoint(default_model(), model_name=MODEL, api_keys=ApiKeys([KEY]),
                                           limits=RequestLimits(default_max_tokens=4))
    statuses: collections.Counter = collections.Counter()
    failures: list[str] = []
    good = Probe("POST", PATHS[0], json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4,
                                               "temperature": 0, "ignore_eos": True}).encode())
    with serving(build_openai_app(backend)) as base:
        before = send(base, good)

        @seed(a.seed)
        @settings(max_examples=a.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(probe=probes())
        def run(probe: Probe) -> None:
            status, body = send(base, probe)
            statuses[status] += 1
            if (why := server_error(status, body)) is not None:
                failures.append(f"{probe.method} {probe.path} {probe.body[:200]!r}: {why}")

        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        after = send(base, good)
    for status, n in sorted(statuses.items()):
        print(f"status {status}: {n}")
    print(f"probes: {sum(statuses.values())} in {seconds:.0f} s")
    print(f"server errors (5xx or error events): {len(failures)} (target 0)")
    for f in failures[:20]:
        print(f"  {f}")
    same = before[0] == after[0] == 200 and json.loads(before[1])["choices"] == json.loads(after[1])["choices"]
    print(f"a valid request answered the same before and after: {same}")


if __name__ == "__main__":
    main()
