"""Our own C++ kernels, compiled on first use for this machine and loaded as torch ops.

A library is built with torch's JIT builder (a C++ compiler and ninja) for this machine's
CPU (-march=native), into the moe-serve cache ($MOE_SERVE_CACHE, default ~/.cache/moe-serve):
tens of seconds the first time on a machine, then loaded from there. Where it cannot be
built, or with MOE_SERVE_CPU_KERNELS=0, `load` answers False and callers keep torch's path,
which gives the same results to rounding.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import torch

from mixtral.config import CACHE

log = logging.getLogger(__name__)


def _build_dir(name: str, sources: tuple[Path, ...]) -> Path:
    # -march=native ties the build to this CPU; a cache shared by different machines keeps one each.
    cpu = ""
    try:
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    # The sources and the headers beside them too: a changed kernel is built afresh rather than
    # over the old one. And where they live: the build records their paths, so two checkouts
    # sharing a folder would take turns rebuilding it.
    folders = sorted({p.parent for p in sources})
    code = b"".join(p.read_bytes() for d in folders for p in sorted(d.iterdir()) if p.suffix in (".cpp", ".h"))
    where = f"{platform.machine()} {cpu} {torch.__version__} {' '.join(map(str, sources))}"
    tag = hashlib.sha256(where.encode() + code).hexdigest()[:12]
    return CACHE / "kernels" / f"{name}-{tag}"


@functools.cache
def load(name: str, sources: tuple[Path, ...], what: str) -> bool:
    """Build (once per machine) and load the library `name` from sources; what names it in logs.
    True when its ops are registered under torch.ops."""
    if os.environ.get("MOE_SERVE_CPU_KERNELS", "1") == "0":
        log.info("CPU kernels off (MOE_SERVE_CPU_KERNELS=0): %s use torch's path", what)
        return False
    try:
        from torch.utils.cpp_extension import load as jit_load

        build = _build_dir(name, sources)
        build.mkdir(parents=True, exist_ok=True)
        fresh = not any(build.glob("*.so"))
        if fresh:
            log.info("building the CPU kernels for %s on this machine (once, tens of seconds) in %s", what, build)
        t0 = time.perf_counter()
        jit_load(name=name, sources=[str(p) for p in sources], build_directory=str(build),
                 extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                 is_python_module=False, verbose=False)
        if fresh:
            log.info("built the CPU kernels for %s in %.0f s", what, time.perf_counter() - t0)
        return True
    except Exception as e:  # no compiler, no ninja, a failed build: the torch path still works
        log.warning("CPU kernels for %s unavailable, using torch's path instead: %s", what, e)
        return False
