"""Attention and experts on different (emulated) nodes, placed by custom node resources."""

import asyncio

import openai
import pytest
from ray import serve
from ray.cluster_utils import Cluster

from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine
from cluster.tools.harness import running_app

pytestmark = pytest.mark.e2e   # starts a Ray cluster and the whole app


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 8, "resources": {"attention_node": 1}, "node_ip_address": "127.0.0.1"})
    cluster.add_node(num_cpus=8, resources={"expert_node": 1}, node_ip_address="127.0.0.1")
    yield cluster
    cluster.shutdown()


def test_attention_and_experts_on_separate_nodes_generate_the_same_tokens(two_nodes, tiny_ckpt):
    config = {"attention": {"resources": {"attention_node": 0.5}},
              "expert_groups": [{"experts": [0, 1, 2, 3], "resources": {"expert_node": 0.1}},
                                {"experts": [4, 5, 6, 7], "resources": {"expert_node": 0.1}}]}
    with running_app(tiny_ckpt, address=two_nodes.address, **config) as (cfg, url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        got = client.completions.create(model=model, prompt=[1, 7, 8, 9], max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True})
        attention = serve.get_deployment_handle("Attention", app_name=cfg.name).load.remote().result()
        experts = [serve.get_deployment_handle(f"ExpertGroup-{g}", app_name=cfg.name).describe.remote().result()
                   for g in range(2)]
    head, worker = two_nodes.head_node.node_id, two_nodes.list_all_nodes()[1].node_id
    assert attention["node_id"] == head
    assert all(e["node_id"] == worker for e in experts)
    engine, tok = build_engine(tiny_ckpt)
    (seq,) = asyncio.run(engine.generate([[1, 7, 8, 9]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)))
    assert got.usage.completion_tokens == 10
    assert got.choices[0].text == tok.decode([7, 8, 9] + seq.output_ids)[len(tok.decode([7, 8, 9])):]
