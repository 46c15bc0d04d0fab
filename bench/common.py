"""Small helpers shared by the benchmarks in bench/: checkpoint cache, workload, timing, report.

The machine these run on is shared, so every timed run also records how much CPU other
processes used meanwhile (`Sample.others_cpu_s`, from /proc/stat): with torch using every
core, any outside load slows a run down many times over (OpenMP waits at each barrier for
the thread that was descheduled), and such a run says nothing about the code.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.tools import tune_series

REPO = Path(__file__).resolve().parent.parent

OUT_DIR = REPO / "bench" / "out"
CACHE_DIR = Path(os.environ.get("MOE_SERVE_BENCH_CACHE", Path.home() / ".cache" / "moe-serve" / "bench"))

# A run is "contended" when other processes used more than this share of one core on average.
CONTENDED_SHARE = 0.2


def checkpoint(preset_name: str = "bench", seed: int = 0, variant: str | None = None,
               dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A random-weight checkpoint of the preset, written once into the cache and reused
    (rewritten if the preset's config has changed since). A variant changes some of the
    preset's fields (overrides, e.g. num_hidden_layers=1) and is cached under its own name."""
    import msgspec

    from mixtral.config import preset
    from mixtral.random_checkpoint import write_random_checkpoint

    if overrides and not variant:
        raise ValueError("a checkpoint with overrides needs a variant name")
    cfg = msgspec.structs.replace(preset(preset_name), **overrides) if overrides else preset(preset_name)
    stamp = {"config": msgspec.to_builtins(cfg), "seed": seed}
    stamp = json.dumps(stamp | ({"dtype": str(dtype)} if dtype != torch.float32 else {}), sort_keys=True)
    name = f"{preset_name}-{variant}" if variant else preset_name
    out = CACHE_DIR / (f"{name}-ckpt" if seed == 0 else f"{name}-seed{seed}-ckpt")
    done = out / ".complete"
    if not done.exists() or done.read_text() != stamp:
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_random_checkpoint(cfg, tmp, seed=seed, dtype=dtype)
        (tmp / ".complete").write_text(stamp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def fill_defaults(a, quick: dict, full: dict):
    """Arguments left unset take the --quick or the full run's value; -> a."""
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def random_prompts(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of lengths uniform in [min_len, max_len]: BOS (1) then ids from [3, vocab)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [[1] + torch.randint(3, vocab, (k - 1,), generator=g).tolist() for k in lens]


def pids_cpu_s(pids) -> float:
    """CPU seconds (user + system, all threads) used so far by the live processes in pids;
    a process that is gone counts 0."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])      # utime, stime (fields 14, 15 of stat)
    return total / tick


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        c = [int(x) for x in f.readline().split()[1:]]
    return (sum(c[:3]) + sum(c[5:8])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    wall_s: float
    own_cpu_s: float
    others_cpu_s: float
    aborted: bool = False      # stopped early because other processes took the CPU: no figure

    @property
    def contended(self) -> bool:
        return self.aborted or self.others_cpu_s > CONTENDED_SHARE * self.wall_s

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 3), "own_cpu_s": round(self.own_cpu_s, 2),
                "others_cpu_s": round(self.others_cpu_s, 2), "contended": self.contended, "aborted": self.aborted}


class Aborted(Exception):
    """A run stopped by its watchdog."""


def timed(fn, abortable: bool = False, grace_s: float = 5.0, own_pids=()) -> tuple[object, Sample]:
    """Run fn(abort) once -> (its result, Sample); abort is a threading.Event that fn should
    poll and answer by raising Aborted. When abortable, a watchdog sets it as soon as other
    processes have used more than CONTENDED_SHARE of a core over max(elapsed, grace_s).
    own_pids: processes of ours (expert shards, servers) whose CPU counts as the run's own."""
    abort, done = threading.Event(), threading.Event()
    own_pids = list(own_pids)

    def own() -> float:
        return sum(os.times()[:4]) + pids_cpu_s(own_pids)

    b0, c0 = _busy_cpu_s(), own()
    t0 = time.perf_counter()

    def others() -> float:
        return max(0.0, _busy_cpu_s() - b0 - (own() - c0))

    def watch() -> None:
        while not done.wait(0.25):
            if others() > CONTENDED_SHARE * max(time.perf_counter() - t0, grace_s):
                abort.set()
                return

    dog = threading.Thread(target=watch, daemon=True)
    if abortable:
        dog.start()
    try:
        result = fn(abort)
        stopped = False
    except Aborted:
        result, stopped = None, True
    finally:
        done.set()
        if abortable:
            dog.join()
    wall = time.perf_counter() - t0
    return result, Sample(wall, own() - c0, others(), aborted=stopped)


def wait_for_quiet(max_wait_s: float, window_s: float = 1.0, own_pids=()) -> float:
    """Wait (up to max_wait_s) for a window_s-long stretch in which other processes use less than
    CONTENDED_SHARE of a core; call it with nothing of ours running (idle processes of ours in
    own_pids, e.g. expert shards, are not counted as others). -> seconds waited."""
    t0 = time.perf_counter()
    own_pids = list(own_pids)
    while True:
        b0, c0 = _busy_cpu_s(), sum(os.times()[:4]) + pids_cpu_s(own_pids)
        time.sleep(window_s)
        others = _busy_cpu_s() - b0 - (sum(os.times()[:4]) + pids_cpu_s(own_pids) - c0)
        if others < CONTENDED_SHARE * window_s or time.perf_counter() - t0 >= max_wait_s:
            return time.perf_counter() - t0


def median_wall(samples: list[Sample]) -> tuple[float, int, bool]:
    """Median wall time over the uncontended samples, or over the completed ones if none is
    uncontended -> (median, number of samples it is over, whether they were uncontended)."""
    clean = [s.wall_s for s in samples if not s.contended]
    if clean:
        return statistics.median(clean), len(clean), True
    done = [s.wall_s for s in samples if not s.aborted]
    return (statistics.median(done) if done else float("nan")), len(done), False


def percentile(xs, q: float) -> float:
    """The q-th percentile (0-100) of xs, linear between closest ranks; nan if xs is empty."""
    return tune_series.percentile(list(xs), q, empty=float("nan"))


class Runner:
    """Times runs the way every benchmark here does. Each run waits for a quiet machine first
    (at most quiet_wait_s). While a retry is left and the time budget holds, a run is watched
    and stopped as soon as other processes take the CPU, and a stopped or contended run is
    redone. own_pids: processes of ours (expert shards) whose CPU is the run's own; it may be
    changed between runs."""

    def __init__(self, t0: float, budget_s: float, max_retries: int, quiet_wait_s: float, own_pids=()):
        self.t0, self.budget_s, self.max_retries = t0, budget_s, max_retries
        self.quiet_wait_s = quiet_wait_s
        self.own_pids = list(own_pids)
        self.all_samples: list[Sample] = []     # every attempt of every run, for the summary

    @property
    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget_s

    def run(self, label: str, fn, samples: list[Sample], log=print):
        """fn(abort) -> outputs; appends a Sample per attempt; returns the last completed outputs."""
        result = None
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries or self.over_budget
            if self.quiet_wait_s > 0:
                wait_for_quiet(self.quiet_wait_s, own_pids=self.own_pids)
            # The last attempt of a config with no completed run yet is never stopped.
            out, s = timed(fn, abortable=not (last and result is None), own_pids=self.own_pids)
            samples.append(s)
            self.all_samples.append(s)
            if s.aborted:
                log(f"  run {label}: stopped after {s.wall_s:.1f} s, other processes took "
                    f"{s.others_cpu_s:.1f} CPU-s; {'keeping the earlier run' if last else 'redoing it'}")
                continue
            result = out
            note = f" CONTENDED (others took {s.others_cpu_s:.1f} CPU-s)" if s.contended else ""
            log(f"  run {label}: {s.wall_s:.2f} s{note}")
            if not s.contended or last:
                break
        return result


def machine() -> dict:
    """What the figures were measured on."""
    info = {"cpu": platform.processor() or "unknown", "cores": os.cpu_count(), "gpu": "none",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
        with open("/proc/meminfo") as f:
            info["ram_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def announce_machine(bench: str) -> dict:
    """Print the line every benchmark starts with (what it runs on, how loaded) -> machine()."""
    m = machine()
    print(f"{bench} machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['torch_threads']} threads, "
          f"load average {open('/proc/loadavg').read().split()[0]}", flush=True)
    return m


def write_json(name: str, data: dict) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / name
    def encode(o):
        return o.as_dict() if isinstance(o, Sample) else str(o)
    path.write_text(json.dumps(data, indent=2, default=encode) + "\n")
    return path


# --- Hugging Face `generate`, the baseline ----------------------------------------------------
PAD_ID = 0


def load_hf(ckpt: Path, impl: str):
    """MixtralForCausalLM in fp32 with experts `impl` ("eager", "grouped_mm"), set up so that
    nothing stops generation early: the EOS id is unset, so min_new_tokens masks nothing."""
    import transformers

    model = transformers.MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                            experts_implementation=impl).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model


def hf_generate(model, prompts: list[list[int]], outs: int | list[int], batch_size: int, abort=None
                ) -> list[list[int]]:
    """Greedy, left-padded batches of prompts sorted by length; outputs in the prompts' order.
    outs: new tokens for every prompt, or per prompt (a batch then runs for its longest and
    each row is cut to its own count). `abort` (an Event) is checked every decoding step."""
    import transformers

    class Stop(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), abort.is_set(), dtype=torch.bool)

    outs = [outs] * len(prompts) if isinstance(outs, int) else outs
    extra = {} if abort is None else {"stopping_criteria": transformers.StoppingCriteriaList([Stop()])}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    res: list[list[int] | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        L = max(len(prompts[i]) for i in idx)
        n = max(outs[i] for i in idx)
        ids = torch.tensor([[PAD_ID] * (L - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (L - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=mask, do_sample=False, min_new_tokens=n, max_new_tokens=n,
                                 pad_token_id=PAD_ID, **extra)
        if abort is not None and abort.is_set():
            raise Aborted
        for row, i in enumerate(idx):
            res[i] = gen[row, L:L + outs[i]].tolist()
    return res  # type: ignore[return-value]
