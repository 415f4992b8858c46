"""Regenerates the committed gRPC code from proto/, or checks it for drift.

    python scripts/gen_proto.py          # rewrite src/paramserver/v1/*_pb2*.py(i)
    python scripts/gen_proto.py --check  # exit 1 if the committed code differs

The generator is pinned (grpcio-tools in constraints.txt) so that the output is
byte-for-byte reproducible; the package's grpcio/protobuf floors follow it.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "src"
PACKAGE_DIR = Path("paramserver") / "v1"


def generate(out_root: Path) -> list[Path]:
    """Runs protoc for every .proto under proto/; returns the files written."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / PACKAGE_DIR).glob("*_pb2*.py*"))


def check() -> int:
    """Generates into a temporary tree and compares it with the committed one."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = sorted((OUT_ROOT / PACKAGE_DIR).glob("*_pb2*.py*"))
        names = sorted(p.name for p in fresh)
        if names != sorted(p.name for p in committed):
            print(f"generated files differ: {names} vs {[p.name for p in committed]}")
            return 1
        drift = [
            n for n in names
            if not filecmp.cmp(Path(tmp) / PACKAGE_DIR / n, OUT_ROOT / PACKAGE_DIR / n, False)
        ]
    if drift:
        print(f"generated code is out of date: {drift}; run python scripts/gen_proto.py")
        return 1
    print(f"generated code matches proto/ ({len(names)} files)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail on drift, write nothing")
    if parser.parse_args().check:
        return check()
    for path in generate(OUT_ROOT):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
