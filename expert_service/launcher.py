"""Start expert shards as local subprocesses (`python -m expert_service`), one per group.

Each child listens on a port of its own choosing and reports it on its READY line, so
any number of shards can start side by side without port bookkeeping. Their stderr
(the logs) is kept in a bounded tail, which a start failure quotes, and can be echoed.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

_REPO = str(Path(__file__).resolve().parent.parent)


class ShardStartError(RuntimeError):
    """A shard process that died or stayed silent before it was ready."""


class ShardProcess:
    """One running shard process; `.address` is "host:port" once started."""

    def __init__(self, name: str, experts: list[int], process: subprocess.Popen, echo: bool = False):
        self.name, self.experts, self.process = name, experts, process
        self.address: str | None = None
        self._ready = threading.Event()
        self._tail: collections.deque[str] = collections.deque(maxlen=200)
        self._echo = echo
        # The pipes must be read for the child's whole life: a full pipe blocks its writer.
        self._readers = [threading.Thread(target=f, daemon=True) for f in (self._read_stdout, self._read_stderr)]
        for t in self._readers:
            t.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            if line.startswith("READY ") and self.address is None:
                self.address = line.split()[1]
                self._ready.set()
        self._ready.set()  # EOF: the child is gone; wake whoever waits for READY

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self._tail.append(line)
            if self._echo:
                sys.stderr.write(f"[{self.name}] {line}")

    def stderr_tail(self, lines: int = 40) -> str:
        return "".join(list(self._tail)[-lines:])

    def wait_ready(self, timeout: float) -> str:
        if not self._ready.wait(timeout):
            self.kill()
            raise ShardStartError(f"expert shard {self.name} (experts {self.experts}) was not ready after "
                                  f"{timeout:.0f}s; its stderr:\n{self.stderr_tail()}")
        if self.address is None:
            code = self.process.wait()
            self._readers[1].join(5)  # let the last lines of stderr arrive
            raise ShardStartError(f"expert shard {self.name} (experts {self.experts}) exited with code {code} "
                                  f"before it was ready; its stderr:\n{self.stderr_tail()}")
        return self.address

    def terminate(self) -> None:
        """SIGTERM: the shard drains and exits; does not wait."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited after timeout; the exit code."""
        self.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait()

    def kill(self) -> None:
        """SIGKILL: a crash, no draining (for failure tests)."""
        if self.process.poll() is None:
            self.process.kill()

    def __repr__(self) -> str:
        return f"ShardProcess({self.name!r}, experts={self.experts}, address={self.address!r}, pid={self.process.pid})"


def start_shards(model_dir: str | Path, groups: list[list[int]], host: str = "127.0.0.1",
                 layers: list[int] | None = None, env: dict[str, str] | None = None, device: str = "cpu",
                 dtype: str = "auto", timeout: float = 120.0, extra_args: Sequence[str] = (),
                 echo: bool = False) -> list[ShardProcess]:
    """One shard per group of expert ids, shard i named g<i>; returns once all are READY.

    env adds to (not replaces) this process's environment. If any shard fails to start,
    all are stopped and ShardStartError quotes the failing one's stderr."""
    # CPU shards sharing a machine must not spin OpenMP threads against each other (and
    # against the attention process): one thread each unless the caller says otherwise.
    child_env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if device == "cpu" else {}), **(env or {})}
    # Run from any working directory, installed or not.
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, child_env.get("PYTHONPATH")) if p)
    shards: list[ShardProcess] = []
    try:
        for i, experts in enumerate(groups):
            cmd = [sys.executable, "-m", "expert_service", "--model", str(model_dir),
                   "--experts", ",".join(map(str, experts)), "--port", "0", "--host", host,
                   "--device", device, "--dtype", dtype, "--shard-id", f"g{i}", *extra_args]
            if layers is not None:
                cmd += ["--layers", ",".join(map(str, layers))]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, bufsize=1, env=child_env)
            shards.append(ShardProcess(f"g{i}", list(experts), proc, echo))
        deadline = time.monotonic() + timeout
        for s in shards:  # they load in parallel; wait for each in turn
            s.wait_ready(max(0.0, deadline - time.monotonic()))
    except BaseException:
        stop_shards(shards, timeout=5.0)
        raise
    return shards


def stop_shards(shards: list[ShardProcess], timeout: float = 30.0) -> list[int]:
    """Signal every shard first so that they drain in parallel, then wait for each."""
    for s in shards:
        s.terminate()
    return [s.stop(timeout) for s in shards]


@contextlib.contextmanager
def running_shards(model_dir: str | Path, groups: list[list[int]], **kwargs) -> Iterator[list[ShardProcess]]:
    """`start_shards` as a context manager: the shards are stopped on exit."""
    shards = start_shards(model_dir, groups, **kwargs)
    try:
        yield shards
    finally:
        stop_shards(shards)
