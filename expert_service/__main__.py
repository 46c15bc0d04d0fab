"""`python -m expert_service`: run one expert shard until SIGTERM or SIGINT.

Once it listens it prints `READY <host>:<port>` on stdout (its only stdout line; logs go
to stderr), which is what launchers wait for. A signal drains it: Health turns DRAINING,
in-flight batches finish, and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

EPILOG = """\
examples:
  python -m expert_service --model ckpt/ --experts 0,4 --port 50051
  python -m expert_service --model ckpt/ --experts 1 --layers 0,1 --port 0 --shard-id g1
  python -m expert_service --model ckpt/ --experts 0,1,2,3 --echo     # the wire alone, no compute

With --port 0 the system picks a free port; read it from the READY line.
"""


def _int_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one id")
    return ids


def _layers(text: str) -> list[int] | None:
    return None if text == "all" else _int_list(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m expert_service", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve the expert FFNs of some (layer, expert) pairs of a Mixtral checkpoint over gRPC "
                    "(the ExpertShard service of protos/expert.proto).")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--experts", required=True, type=_int_list, metavar="IDS",
                   help="comma-separated expert ids this shard holds, e.g. 0,4")
    p.add_argument("--layers", type=_layers, default=None, metavar="all|IDS",
                   help="layers to hold those experts for (default: all)")
    p.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default: 0)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--device", default="cpu", help="torch device for the weights, e.g. cpu, cuda:0 (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "fp8"],
                   help="compute dtype; hidden rows must arrive in it. auto: the checkpoint's on CPU, "
                        "bfloat16 on GPU. fp8: e4m3 weights with per-channel scales, quantised at load; "
                        "rows travel in auto's dtype (default: auto)")
    p.add_argument("--shard-id", default=None, metavar="NAME", help="name reported by Info and in logs")
    p.add_argument("--max-message-bytes", type=int, default=None, metavar="N",
                   help="largest gRPC message sent or received; larger ones fail with RESOURCE_EXHAUSTED "
                        "(default: 512 MiB)")
    p.add_argument("--echo", action="store_true",
                   help="load no expert weights and answer each batch with its own rows (dequantized if fp8): "
                        "the full data path without the math, for measuring the wire (bench/wire.py). "
                        "Attention shards refuse to serve through an echo shard")
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long to wait for in-flight batches (default: 10)")
    return p


async def run(a: argparse.Namespace) -> None:
    from expert_service.server import DEFAULT_MAX_MESSAGE_BYTES, serve

    server, port = await serve(a.model, a.experts, a.layers, a.port, host=a.host, device=a.device, dtype=a.dtype,
                               shard_id=a.shard_id, max_message_bytes=a.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
                               echo=a.echo)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {server.address}", flush=True)
    await stop.wait()
    await server.drain(a.grace)


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mixtral.checkpoint import CheckpointError
    from mixtral.config import ConfigError

    try:
        asyncio.run(run(a))
    except (CheckpointError, ConfigError, ValueError, RuntimeError, OSError) as e:
        sys.exit(f"expert_service: {e}")


if __name__ == "__main__":
    main()
