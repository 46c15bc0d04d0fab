"""The wire: our expert RPC round trip against a raw TCP socket's, for the same bytes.

What it measures
    On loopback, batches of --rows rows (default 16, 64, 256, 1024) of 8x22B's hidden size
    (6144), sent to one expert group and answered, in two wire dtypes: bf16 (the model's
    dtype on GPU) and fp8 (e4m3 rows with a scale per row; answers in bf16). Per batch size
    and dtype, one line per figure:

    ours echo     `GrpcTransport.forward` (the attention side's path: gather, quantize,
                  pack, ForwardStream, unpack) to an echo shard (`python -m expert_service
                  --echo`: the shard's whole data path, validation and its compute thread,
                  without the math), median round trip.
    ours compute  the same to a computing shard of a checkpoint with 8x22B's hidden size
                  and a small FFN (16), bf16, so that the expert math is modest.
    unary echo    the same packed request as one unary Forward call per batch, the call
                  style the transport used before it kept streams (docs/wire.md).
    grpc bare     a bidirectional grpc.aio stream to a bench-local server that answers each
                  message with preallocated bytes of the reply's length, nothing else: what
                  gRPC itself costs for these byte counts, without our code on either side.
    raw           a raw TCP round trip of the same request and reply byte counts between
                  this process and a second Python process (length-prefixed, preallocated
                  buffers, recv_into, TCP_NODELAY): what Python can do over a socket.
    GB/s          (request + reply bytes) / round trip, for each.
    ratio         ours echo / raw (target <= 1.3 at 256 rows and up), and its two parts:
                  grpc bare / raw (gRPC's) and ours echo / grpc bare (ours).

    Calls alternate (ours, raw, unary, bare, compute) so that load from other processes falls on
    all alike; figures are medians of --iters rounds. Every run also checks the echo's
    answers equal what was sent (bf16 bit for bit; fp8 within its rounding) and the
    computing shard's equal the same experts computed here.

Run: python -m bench.wire            (--quick: 16 and 256 rows, a few rounds, under a minute)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

import torch

from bench import common

HIDDEN = 6144
FFN = 16   # the computing shard's: bf16 matmuls on a CPU are slow, and the figure is about the wire
ROWS = [16, 64, 256, 1024]
_HEAD = struct.Struct("<QQ")


# --- the raw socket baseline ------------------------------------------------------------
def raw_server() -> None:
    """Answer each (request length, reply length) header and request with reply-length bytes."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    conn, _ = ls.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(256 << 20))
    head = memoryview(bytearray(_HEAD.size))
    while _recv_into(conn, head, _HEAD.size):
        req, rep = _HEAD.unpack(head)
        _recv_into(conn, buf, req)
        conn.sendall(buf[:rep])


def _recv_into(conn: socket.socket, buf: memoryview, n: int) -> bool:
    got = 0
    while got < n:
        k = conn.recv_into(buf[got:n])
        if not k:
            return False
        got += k
    return True


def grpc_bare_server() -> None:
    """A ForwardStream-shaped echo with nothing in it: each message's first 8 bytes say how
    many bytes to answer with, taken from one preallocated buffer."""
    import grpc

    from protos.channel import channel_options

    reply = bytes(256 << 20)

    async def stream(requests, context):
        async for r in requests:
            await context.write(reply[:struct.unpack_from("<Q", r)[0]])

    async def run():
        server = grpc.aio.server(options=channel_options())
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(stream)})])
        print(server.add_insecure_port("127.0.0.1:0"), flush=True)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def _spawn(flag: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.wire", flag], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(common.REPO)})
    return proc, int(proc.stdout.readline())


class GrpcBare:
    async def open(self) -> "GrpcBare":
        import grpc

        from protos.channel import channel_options

        self.proc, port = _spawn("--grpc-bare-server")
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
        self.call = self.channel.stream_stream("/bench.Echo/Stream")()
        return self

    async def round_trip(self, request: bytes) -> float:
        t0 = time.perf_counter()
        await self.call.write(request)
        await self.call.read()
        return time.perf_counter() - t0

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()
        self.proc.kill()
        self.proc.wait(10)


class RawClient:
    def __init__(self):
        self.proc, port = _spawn("--raw-server")
        self.conn = socket.create_connection(("127.0.0.1", port))
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = memoryview(bytearray(256 << 20))

    def round_trip(self, request: bytes, reply_bytes: int) -> float:
        t0 = time.perf_counter()
        self.conn.sendall(_HEAD.pack(len(request), reply_bytes))
        self.conn.sendall(request)
        _recv_into(self.conn, self.buf, reply_bytes)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.conn.close()
        self.proc.wait(10)


# --- our side ---------------------------------------------------------------------------
def _batch(rows: int, seed: int):
    from router.dispatch import GroupBatch

    g = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, HIDDEN, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(rows)]).to(torch.int32)
    w = torch.softmax(torch.randn(rows, 2, generator=g), -1)
    return y, GroupBatch(0, torch.arange(rows), ids, w)


async def _unary(address: str):
    import functools

    import grpc

    from protos import codec
    from protos import expert_pb2 as pb
    from protos.channel import FORWARD, channel_options

    ch = grpc.aio.insecure_channel(address, options=channel_options())
    return ch, ch.unary_unary(FORWARD, request_serializer=None,
                              response_deserializer=functools.partial(codec.unpack, pb.ExpertResult))


async def measure(a, echo_addr: str, compute_addr: str, oracle) -> tuple[list[dict], bool]:
    from attention_service.grpc_transport import GrpcTransport
    from protos import codec
    from protos import expert_pb2 as pb
    from protos.wire_fp8 import dequantize_rows, quantize_rows

    raw, bare, results, ok = RawClient(), await GrpcBare().open(), [], True
    unary_ch, unary = await _unary(echo_addr)
    try:
        for wire in ("bf16", "fp8"):
            kw = dict(wire_dtype="fp8" if wire == "fp8" else "model", connections=a.connections)
            echo, compute = GrpcTransport([[echo_addr]], **kw), GrpcTransport([[compute_addr]], **kw)
            for rows in a.rows:
                y, b = _batch(rows, seed=rows)
                # The request bytes, as the transport packs them, for the raw and unary sides.
                t = dict(zip(("hidden", "hidden_scale"), quantize_rows(y))) if wire == "fp8" else {"hidden": y}
                request = codec.pack(pb.ExpertBatch(batch_id=1, layer=0), **t, expert_ids=b.expert_ids,
                                     weights=b.weights)
                reply_bytes = len(codec.pack(pb.ExpertResult(batch_id=1, compute_seconds=1.0, rows=2 * rows),
                                             output=y))
                # The bare server's request: the reply length, then filler to the same size.
                bare_request = struct.pack("<Q", reply_bytes) + bytes(len(request) - 8)
                times: dict[str, list[float]] = {"ours echo": [], "raw": [], "unary echo": [], "grpc bare": [],
                                                 "ours compute": []}
                for i in range(a.warmup + a.iters):
                    t0 = time.perf_counter()
                    out, = await echo.forward(0, y, [b])
                    t1 = time.perf_counter()
                    r = raw.round_trip(request, reply_bytes)
                    t2 = time.perf_counter()
                    await unary(request, timeout=60)
                    t3 = time.perf_counter()
                    g = await bare.round_trip(bare_request)
                    t4 = time.perf_counter()
                    got, = await compute.forward(0, y, [b])
                    t5 = time.perf_counter()
                    if i >= a.warmup:
                        for k, v in zip(times, (t1 - t0, r, t3 - t2, g, t5 - t4)):
                            times[k].append(v)
                sent = dict(zip(t, quantize_rows(y))) if wire == "fp8" else None
                expect = dequantize_rows(sent["hidden"], sent["hidden_scale"], torch.bfloat16) if sent else y
                echo_ok = torch.equal(out, expect)
                compute_ok = torch.equal(got, oracle(y if wire == "bf16" else expect, b))
                ok &= echo_ok and compute_ok
                med = {k: statistics.median(v) for k, v in times.items()}
                total = len(request) + reply_bytes
                res = {"wire": wire, "rows": rows, "request_bytes": len(request), "reply_bytes": reply_bytes,
                       **{f"{k} s": v for k, v in med.items()}, "ratio": med["ours echo"] / med["raw"],
                       "grpc_ratio": med["grpc bare"] / med["raw"], "ours_ratio": med["ours echo"] / med["grpc bare"],
                       "echo_ok": echo_ok, "compute_ok": compute_ok}
                results.append(res)
                for k, v in med.items():
                    print(f"wire {wire} rows {rows:5d} {k:<12} {v * 1e3:8.3f} ms  {total / v / 1e9:6.2f} GB/s",
                          flush=True)
                print(f"wire {wire} rows {rows:5d} ratio ours/raw {res['ratio']:.2f} = grpc bare/raw "
                      f"{res['grpc_ratio']:.2f} x ours/grpc bare {res['ours_ratio']:.2f}   "
                      f"(request {len(request) / 2**20:.2f} MiB, reply {reply_bytes / 2**20:.2f} MiB)", flush=True)
            await echo.close()
            await compute.close()
    finally:
        await unary_ch.close()
        await bare.close()
        raw.close()
    return results, ok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.wire", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=ROWS,
                    help="batch sizes in rows (default: 16,64,256,1024)")
    ap.add_argument("--iters", type=int, default=30, help="timed rounds per batch size (default: 30)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: 3)")
    ap.add_argument("--connections", type=int, default=1, help="TCP connections per shard (default: 1)")
    ap.add_argument("--quick", action="store_true", help="16 and 256 rows, 5 rounds: a smoke run")
    ap.add_argument("--raw-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--grpc-bare-server", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.raw_server:
        return raw_server()
    if a.grpc_bare_server:
        return grpc_bare_server()
    if a.quick:
        a.rows, a.iters, a.warmup = [16, 256], 5, 1
    from expert_service.launcher import running_shards
    from expert_service.loader import load_experts
    from mixtral.checkpoint import Checkpoint

    machine = common.announce_machine("wire")
    # 8x22B's hidden size, a small FFN, one layer, one attention head, tied embeddings in bf16:
    # the 32000-token vocabulary (the tokenizer's) then costs 393 MB, the rest little.
    ckpt = common.checkpoint("bench", variant="wire-8x22b-hidden", dtype=torch.bfloat16, hidden_size=HIDDEN,
                             intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                             head_dim=128, tie_word_embeddings=True, torch_dtype="bfloat16")
    torch.set_num_threads(1)   # as the shards: the oracle then sums in their order
    experts = load_experts(Checkpoint(ckpt, require_tokenizer=False), [(0, e) for e in range(8)], torch.bfloat16)
    oracle = lambda y, b: experts.forward(0, y, b.expert_ids, b.weights)                  # noqa: E731
    all8 = [list(range(8))]
    with running_shards(ckpt, all8, dtype="bfloat16", extra_args=["--echo"]) as (echo,), \
            running_shards(ckpt, all8, dtype="bfloat16") as (compute,):
        results, ok = asyncio.run(measure(a, echo.address, compute.address, oracle))
    print("CHECK OK" if ok else "CHECK FAILED: answers differ from what was sent or computed here", flush=True)
    path = common.write_json("wire.json", {"machine": machine, "args": vars(a), "results": results, "ok": ok})
    print(f"wrote {path}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
