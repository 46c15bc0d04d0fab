"""Expert shards take calls only with the app's token, over TLS and mTLS when configured, and
refuse messages larger than the model can make: real gRPC servers, real certificates."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from pki import make_pki

from attention_service.config import EngineConfig
from attention_service.grpc_transport import GrpcTransport
from attention_service.loader import open_engine
from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine
from expert_service.server import serve
from mixtral.checkpoint import Checkpoint
from protos import expert_pb2 as pb
from protos.channel import INFO
from protos.shard_access import ShardAccess, ShardTLS, message_bytes_for, open_channel
from router.dispatch import Placement

PROMPT = [1, 415, 5565, 302, 4843]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The cluster's CA and certificate (for the name moe-serve-experts), and a stranger's from another CA."""
    out = tmp_path_factory.mktemp("pki")
    files = {}
    for who in ("cluster", "stranger"):
        ca, cert, key = make_pki(out, who, ["moe-serve-experts"])
        files[who] = ShardTLS(ca_file=str(ca), cert_file=str(cert), key_file=str(key), server_name="moe-serve-experts")
    return files


@pytest.fixture(scope="module")
def expected(tiny_ckpt):
    engine, _ = build_engine(tiny_ckpt)
    (seq,) = asyncio.run(engine.generate([PROMPT], GREEDY))
    return seq.output_ids


async def _generate(ckpt_dir, address: str, access: ShardAccess | None, prompt=PROMPT,
                    cfg: EngineConfig = EngineConfig()) -> list[int]:
    ckpt = Checkpoint(ckpt_dir)
    mc = ckpt.config
    placement = Placement.by_expert([list(range(mc.num_local_experts))], mc.num_hidden_layers, mc.num_local_experts)
    engine, _ = open_engine(ckpt, cfg, GrpcTransport([[address]], timeout=10, access=access), placement)
    try:
        (seq,) = await engine.generate([prompt], GREEDY)
    finally:
        await engine.close()
    if seq.finish_reason == "error":           # the step failed: its sequences end with the error named
        raise RuntimeError(seq.error)
    return seq.output_ids


async def _info(address: str, access: ShardAccess | None) -> grpc.StatusCode:
    async with open_channel(address, access) as ch:
        call = ch.unary_unary(INFO, request_serializer=pb.InfoRequest.SerializeToString,
                              response_deserializer=pb.ShardInfo.FromString)
        try:
            await call(pb.InfoRequest(), timeout=10)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            return e.code()


def test_a_shard_with_a_token_serves_only_callers_that_present_it(tiny_ckpt, expected):
    async def run():
        server, port = await serve(tiny_ckpt, list(range(8)), access=ShardAccess(token="s3cret"))
        addr = f"127.0.0.1:{port}"
        try:
            codes = [await _info(addr, a) for a in (None, ShardAccess(token="wrong"), ShardAccess(token="s3cret"))]
            with pytest.raises(RuntimeError, match="UNAUTHENTICATED"):
                await _generate(tiny_ckpt, addr, ShardAccess(token="guess"))
            return codes, await _generate(tiny_ckpt, addr, ShardAccess(token="s3cret"))
        finally:
            await server.stop(None)
    codes, out = asyncio.run(run())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK]
    assert out == expected
    assert "s3cret" not in repr(ShardAccess(token="s3cret"))


@pytest.mark.parametrize("mutual", [True, False])
def test_tls_and_mutual_tls(tiny_ckpt, expected, pki, mutual):
    import msgspec
    tls = msgspec.structs.replace(pki["cluster"], mutual=mutual)
    stranger = msgspec.structs.replace(pki["stranger"], mutual=mutual)

    async def run():
        server, port = await serve(tiny_ckpt, list(range(8)), access=ShardAccess(token="t", tls=tls))
        addr = f"127.0.0.1:{port}"
        try:
            plain = await _info(addr, ShardAccess(token="t"))                       # no TLS at all
            other_ca = await _info(addr, ShardAccess(token="t", tls=stranger))      # does not trust the server
            # Trusts the server, but its own certificate is from another CA: only mTLS refuses it.
            forged = await _info(addr, ShardAccess(token="t", tls=msgspec.structs.replace(
                stranger, ca_file=tls.ca_file)))
            return plain, other_ca, forged, await _generate(tiny_ckpt, addr, ShardAccess(token="t", tls=tls))
        finally:
            await server.stop(None)
    plain, other_ca, forged, out = asyncio.run(run())
    assert plain == other_ca == grpc.StatusCode.UNAVAILABLE
    assert forged == (grpc.StatusCode.UNAVAILABLE if mutual else grpc.StatusCode.OK)
    assert out == expected


def test_message_caps_fit_the_largest_step_and_refuse_more(tiny_ckpt):
    mc = Checkpoint(tiny_ckpt).config
    rows = 64
    cap = message_bytes_for(mc.hidden_size, rows, mc.num_experts_per_tok)
    assert cap < 64 << 20        # far below the 512 MiB default for this model

    async def run():
        server, port = await serve(tiny_ckpt, list(range(8)), max_message_bytes=cap)
        addr = f"127.0.0.1:{port}"
        access = ShardAccess(max_message_bytes=cap)
        try:
            fits = await _generate(tiny_ckpt, addr, access, prompt=[1] * rows,
                                   cfg=EngineConfig(max_batched_tokens=rows))
            # A step with more rows than the cap was sized for: the shard refuses its batch unread.
            over = cap // (4 * mc.hidden_size) + 1
            with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
                await _generate(tiny_ckpt, addr, ShardAccess(max_message_bytes=1 << 30), prompt=[1] * over,
                                cfg=EngineConfig(max_batched_tokens=over))
            return fits
        finally:
            await server.stop(None)
    assert len(asyncio.run(run())) == GREEDY.max_tokens
