"""Fuzzing the OpenAI front door (a real uvicorn over a LocalBackend): no bad input gets a 5xx,
and the server answers a valid request the same way afterwards. `python -m bench.fuzz_api`
runs the same probes by the thousand."""

import json

import pytest
from hypothesis import HealthCheck, given, settings

from bench.fuzz_api import KEY, MODEL, PATHS, Probe, probes, send, server_error
from cluster.api.access import ApiKeys
from cluster.api.backend import LocalBackend
from cluster.api.limits import RequestLimits
from cluster.api.openai_api import build_openai_app
from cluster.tools.harness import serving

GOOD = Probe("POST", PATHS[0], json.dumps({"model": MODEL, "prompt": [1, 415, 5565], "max_tokens": 4,
                                           "temperature": 0, "ignore_eos": True}).encode())


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    backend = LocalBackend.from_checkpoint(tiny_ckpt, model_name=MODEL, api_keys=ApiKeys([KEY]),
                                           limits=RequestLimits(default_max_tokens=4))
    with serving(build_openai_app(backend)) as url:
        status, body = send(url, GOOD)
        assert status == 200
        yield url, body


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(probe=probes())
def test_no_input_gets_a_server_error(server, probe):
    url, _ = server
    status, body = send(url, probe)
    assert server_error(status, body) is None, f"{probe.method} {probe.path} {probe.body[:300]!r}"
    if status >= 400:             # every refusal is OpenAI's error body
        assert set(json.loads(body)["error"]) >= {"message", "type", "param", "code"}


def test_the_server_answers_the_same_after_the_fuzzing(server):
    url, first = server
    status, body = send(url, GOOD)
    assert status == 200 and json.loads(body)["choices"] == json.loads(first)["choices"]
