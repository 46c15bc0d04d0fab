"""The `moe-serve` command line."""

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from cluster.serve.app_config import default_model


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def cmd_make_checkpoint(a: argparse.Namespace) -> None:
    import torch

    from mixtral.config import preset
    from mixtral.random_checkpoint import write_random_checkpoint

    out = write_random_checkpoint(preset(a.preset), Path(a.out), shards=a.shards, seed=a.seed,
                                  dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype],
                                  favour_experts=a.favour_experts, favour=a.favour)
    print(out)


def _engine_config(a: argparse.Namespace):
    from attention_service.config import EngineConfig

    return EngineConfig(device=a.device, dtype=a.dtype, micro_batches=a.micro_batches)


def cmd_generate(a: argparse.Namespace) -> None:
    from attention_service.loader import connect_engine
    from attention_service.sampling_params import SamplingParams
    from cluster.local import build_engine

    async def run():
        model = a.model or default_model()
        if a.experts_at:
            engine, tok = await connect_engine(model, a.experts_at, _engine_config(a), progress=not a.json)
        else:
            engine, tok = build_engine(model, _engine_config(a), progress=not a.json)
        prompt = a.prompt_ids if a.prompt_ids is not None else tok.encode(a.prompt)
        params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                                top_k=a.top_k, seed=a.seed, ignore_eos=a.ignore_eos)
        try:
            (seq,) = await engine.generate([prompt], params)
        finally:
            await engine.close()
        return seq, tok

    try:
        seq, tok = asyncio.run(run())
    except (ValueError, RuntimeError) as e:
        sys.exit(f"moe-serve generate: {e}")
    text = tok.decode(seq.output_ids)
    if a.json:
        print(json.dumps({"token_ids": seq.output_ids, "text": text}))
    else:
        print(text)


def cmd_experts(a: argparse.Namespace) -> None:
    """Start G local expert shard processes and keep them up until interrupted."""
    import signal

    from expert_service.launcher import start_shards
    from mixtral.checkpoint import Checkpoint
    from router.dispatch import split_experts

    model = a.model or default_model()
    groups = split_experts(Checkpoint(model).config.num_local_experts, a.groups)
    shards = start_shards(model, groups * a.replicas, host=a.host)
    try:
        for s in shards:
            print(f"experts {s.experts} at {s.address}", flush=True)
        print(f"--experts-at {','.join(s.address for s in shards)}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        for s in shards:
            s.stop()


def _loopback_ray() -> None:
    """A local cluster stays on 127.0.0.1: without this Ray rewrites loopback addresses into
    the host's interface address when a driver connects. Must run before ray is imported."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def cmd_up(a: argparse.Namespace) -> None:
    """Deploy the app on a local Ray cluster (or join --address) and serve until interrupted."""
    if not a.address:
        _loopback_ray()
    import signal
    import time

    import ray
    from ray import serve

    from cluster.api.access import ApiKeys
    from cluster.serve import app_config
    from cluster.serve.builder import build_app, deploy, set_ray_env
    from mixtral.config import ConfigError

    try:
        cfg = app_config.load(a.config) if a.config else app_config.AppConfig()
        model = cfg.model or str(default_model())
        build_app(cfg, model)            # checks the config against the checkpoint before Ray starts
    except (ConfigError, ValueError) as e:
        sys.exit(f"moe-serve up: {e}")
    if a.address:
        ray.init(address=a.address, namespace="moe-serve", log_to_driver=a.verbose)
    else:
        set_ray_env(cfg)
        # A local cluster on loopback; logical CPUs beyond the cores let every deployment
        # place a replica on a small machine (they are bookkeeping, not pinning).
        ray.init(_node_ip_address="127.0.0.1", num_cpus=max(16, os.cpu_count() or 1), include_dashboard=False,
                 namespace="moe-serve", log_to_driver=a.verbose)
    print(f"deploying {cfg.name}: model {model}", flush=True)
    try:
        deploy(cfg, model)
    except RuntimeError as e:
        serve.shutdown()
        ray.shutdown()
        sys.exit(f"moe-serve up: {e}")
    host = "127.0.0.1" if cfg.http_host in ("0.0.0.0", "::") else cfg.http_host
    keyed = ApiKeys.resolve(cfg.api_keys).enabled
    base = f"http://{host}:{cfg.http_port}"
    lines = [
        "", "moe-serve is up.",
        f"  OpenAI HTTP   {base}/v1   (model: see GET /v1/models)",
        f"  gRPC          {host}:{cfg.grpc_port}   service moe_serve.generation.v1.Generation, "
        f"metadata application={cfg.name}",
        f"  health        {base}/health (alive)   {base}/ready (serving: attention reaches every expert group)",
        f"                gRPC grpc.health.v1.Health on {host}:{cfg.grpc_port} (as /ready); server reflection "
        f"(grpcurl -plaintext {host}:{cfg.grpc_port} list)",
        f"  dashboard     {base}/dashboard{'#key=KEY' if keyed else ''}   metrics {base}/metrics",
        f"  try           curl {base}/v1/completions -H 'Content-Type: application/json'"
        + (" -H 'Authorization: Bearer KEY'" if keyed else "") + " \\",
        f"""                  -d '{{"model": "{app_name(cfg, model)}", "prompt": "Hello", "max_tokens": 16}}'""",
    ]
    if keyed:
        lines.append("  API key       required (MOE_SERVE_API_KEY, api_keys); gRPC metadata authorization=Bearer KEY")
    print("\n".join(lines + ["Ctrl-C or `moe-serve down` stops it."]), flush=True)
    if a.detach:
        return
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop:
        time.sleep(1)
        try:
            if cfg.name not in serve.status().applications:     # `moe-serve down` from elsewhere
                break
        except Exception:
            break
    print("stopping", flush=True)
    serve.shutdown()
    ray.shutdown()


def app_name(cfg, model: str) -> str:
    return cfg.model_name or model.rstrip("/").split("/")[-1]


def cmd_down(a: argparse.Namespace) -> None:
    if not a.address:
        _loopback_ray()
    import ray
    from ray import serve

    try:
        ray.init(address=a.address or "auto", namespace="moe-serve", log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        sys.exit(f"moe-serve down: no running cluster found ({e})")
    serve.shutdown()
    print("moe-serve stopped")


def cmd_demo(a: argparse.Namespace) -> None:
    from attention_service.sampling_params import SamplingParams
    from cluster.local import build_engine

    model = default_model()
    engine, tok = build_engine(model, _engine_config(a), groups=2)
    prompts = ["The capital of France is", "Mixture-of-experts models route each token to", "Hello"]
    seqs = asyncio.run(engine.generate([tok.encode(p) for p in prompts], SamplingParams(max_tokens=24, temperature=0)))
    print(f"model: {model} (random weights: the text is noise, the machinery is real)")
    for p, s in zip(prompts, seqs):
        print(f"\n> {p}\n{tok.decode(s.output_ids)!r}  [{s.num_output} tokens, {s.finish_reason}]")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-serve",
        description="Serve Mixtral-family mixture-of-experts models with disaggregated, independently "
                    "scaled expert shards.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("make-checkpoint", help="write a random-weight Mixtral checkpoint (HF layout + real tokenizer)",
                       description="Write a random-weight Mixtral checkpoint in the Hugging Face layout: config.json, "
                                   "generation_config.json, safetensors (sharded with an index when --shards > 1) "
                                   "and the Mistral tokenizer that matches the vocabulary.")
    m.add_argument("--preset", default="tiny", help="tiny, tiny-v3, bench, mixtral-8x7b, mixtral-8x22b (default: tiny)")
    m.add_argument("--out", required=True, help="folder to write")
    m.add_argument("--shards", type=int, default=1, help="safetensors files to split the weights over (default: 1)")
    m.add_argument("--seed", type=int, default=0, help="weights are a function of the seed (default: 0)")
    m.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    m.add_argument("--favour-experts", type=_ids, metavar="E,E,...",
                   help="make every router prefer these experts: a skewed routing load for autoscaling trials")
    m.add_argument("--favour", type=float, default=0.4,
                   help="how strongly (default 0.4: about 80%% of the tiny preset's routing to 4 of 8 experts)")
    m.set_defaults(fn=cmd_make_checkpoint)

    def engine_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        q.add_argument("--dtype", default="auto", help="auto (checkpoint's on CPU, bfloat16 on GPU), float32, bfloat16")
        q.add_argument("--micro-batches", type=int, default=1,
                       help="split each step into this many micro-batches to overlap attention with expert calls")

    g = sub.add_parser("generate", help="generate from a prompt, offline, in this process",
                       description="Generate from one prompt. With --json, print one JSON object "
                                   '{"token_ids": [...generated ids...], "text": "..."}.')
    g.add_argument("--model", help="checkpoint folder (default: the embedded tiny model)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with the checkpoint's tokenizer, BOS first)")
    src.add_argument("--prompt-ids", type=_ids, help="prompt as comma-separated token ids, used as given")
    g.add_argument("--max-tokens", type=int, default=16, help="tokens to generate at most (default: 16)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 disables the cut (default)")
    g.add_argument("--seed", type=int, help="same seed, same output")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g.add_argument("--experts-at", type=lambda t: [x for x in t.split(",") if x],
                   help="host:port,... of expert shards (see `moe-serve experts`); default: experts in-process")
    engine_args(g)
    g.set_defaults(fn=cmd_generate)

    x = sub.add_parser("experts", help="start local expert shard processes for a quick try",
                       description="Start one expert shard process per group (whole experts dealt round-robin) "
                                   "and print the --experts-at value that `moe-serve generate` takes. "
                                   "Ctrl-C stops them.")
    x.add_argument("--model", help="checkpoint folder (default: the embedded tiny model)")
    x.add_argument("--groups", type=int, default=2, help="expert groups (default: 2)")
    x.add_argument("--replicas", type=int, default=1, help="processes per group (default: 1)")
    x.add_argument("--host", default="127.0.0.1")
    x.set_defaults(fn=cmd_experts)

    u = sub.add_parser("up", help="deploy the Ray Serve app and serve OpenAI HTTP and gRPC",
                       description="Start a local Ray cluster (or join one with --address), deploy the attention "
                                   "and expert-group deployments and the front door, and print where to call it. "
                                   "With no config it serves the embedded tiny model: 1 attention replica, 2 expert "
                                   "groups, on CPU, on 127.0.0.1. Listening beyond loopback (http_host) needs an API "
                                   "key: MOE_SERVE_API_KEY=... in the environment, or api_keys in the config.")
    u.add_argument("--config", help="YAML app config (see README: configuration)")
    u.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    u.add_argument("--detach", action="store_true", help="return once deployed (with --address: leave it running)")
    u.set_defaults(fn=cmd_up)

    dn = sub.add_parser("down", help="stop the app (and Serve) on the running cluster")
    dn.add_argument("--address", help="the Ray cluster (default: the local one)")
    dn.set_defaults(fn=cmd_down)

    d = sub.add_parser("demo", help="generate offline with the embedded tiny model")
    engine_args(d)
    d.set_defaults(fn=cmd_demo)

    from cluster.tools import plan
    plan.add_parser(sub)
    from cluster.tools import top, tune_cli
    top.add_parser(sub)
    tune_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    if getattr(a, "experts_at", None):
        # Before torch starts: threads that spin while waiting for expert replies would take
        # the cores from shards on the same machine.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a.fn(a)


if __name__ == "__main__":
    main()
