"""Generate the Python protobuf/gRPC modules from `proto/` with grpcio-tools.

The generated modules land in `liverec/v1/` (ignored by git), so `proto/liverec/v1/x.proto`
becomes `liverec.v1.x_pb2`. They are produced at set-up and never edited by hand; the test
suite regenerates them into a temporary directory and checks the checked-out copy matches.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((proto_root / "liverec" / "v1").glob("*.proto"))


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) over every .proto; return the files written."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    files = proto_files(proto_root)
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    include = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(f.relative_to(proto_root)) for f in files],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    pkg = out_dir / "liverec" / "v1"
    (pkg / "__init__.py").write_text('"""Generated from proto/liverec/v1 at set-up; do not edit."""\n')
    return sorted(pkg.glob("*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: repo root)")
    args = parser.parse_args(argv)
    written = generate(args.out)
    print(f"generated {len(written)} files under {args.out / 'liverec' / 'v1'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
