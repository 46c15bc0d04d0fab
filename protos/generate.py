"""Regenerate the committed gRPC/protobuf stubs: `make protos` (python -m protos.generate).

protoc runs with the repository root as include path, so the generated grpc modules say
`from protos import expert_pb2` and work wherever the `protos` package is importable.
The output depends only on the .proto files and the grpcio-tools version (pinned in the
`dev` extra), which is what lets tests/test_protos.py compare it byte for byte.
"""

from __future__ import annotations

import importlib.resources
import shutil
import sys
import tempfile
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
ROOT = PROTOS_DIR.parent
PROTO_FILES = ("expert.proto", "generation.proto")


def stub_names(proto: str) -> list[str]:
    stem = proto.removesuffix(".proto")
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


STUBS = [name for proto in PROTO_FILES for name in stub_names(proto)]


def generate(out_dir: Path | str = PROTOS_DIR) -> list[Path]:
    """Write the stubs for PROTO_FILES into out_dir (flat) and return their paths."""
    from grpc_tools import protoc  # dev-only dependency; not needed to import the stubs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        # protoc mirrors the include-relative path (protos/x_pb2.py), so write to a
        # scratch dir and move the files out: out_dir may be anywhere.
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(PROTOS_DIR / p) for p in PROTO_FILES),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args[1:])}")
        written = []
        for name in STUBS:
            dest = out_dir / name
            shutil.copyfile(Path(tmp) / PROTOS_DIR.name / name, dest)
            written.append(dest)
    return written


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else PROTOS_DIR):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
