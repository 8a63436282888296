#!/usr/bin/env python3
"""Regenerate the checked-in gRPC/protobuf code in client/linlens/v1 from protos/.

The generated modules are committed so that installing the client needs neither protoc nor grpcio-tools. That makes
staleness a real risk, so ``--check`` regenerates into a temporary directory and fails (exit 1) when the checked-in
files differ; the test suite runs it.

Usage (from anywhere)::

    python scripts/gen_protos.py           # rewrite client/linlens/v1/linlens_pb2*.py[i]
    python scripts/gen_protos.py --check   # exit 1 and show a diff when they are stale
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = ("linlens/v1/linlens.proto",)
OUT_ROOT = ROOT / "client"
#: The files protoc writes for PROTO_FILES, relative to the output root.
GENERATED = (
    "linlens/v1/linlens_pb2.py",
    "linlens/v1/linlens_pb2.pyi",
    "linlens/v1/linlens_pb2_grpc.py",
    "linlens/v1/linlens_pb2_grpc.pyi",
)


def _plugin(name: str) -> str:
    """Find a protoc plugin next to this interpreter first (the venv), then on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install mypy-protobuf (pip install mypy-protobuf)")
    return found


def generate(out_root: Path) -> None:
    """Run protoc (from grpcio-tools) with the python, grpc and mypy plugins into out_root."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("grpcio-tools is required: pip install grpcio-tools") from exc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(PROTO_ROOT / p) for p in PROTO_FILES),
    ]
    # protoc resolves plugins through PATH as well; keep the venv's bin first so that both agree.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    _postprocess(out_root)


#: Prepended to the generated .pyi stubs. mypy-protobuf writes `# type: ignore` comments that only match a grpc with
#: type stubs; grpcio ships none, so under `warn_unused_ignores` (part of --strict) mypy would report errors in code
#: nobody may edit. Their types are still used by importers; only errors *inside* them are silenced.
STUB_HEADER = "# mypy: ignore-errors\n"


def _postprocess(out_root: Path) -> None:
    for rel in GENERATED:
        if rel.endswith(".pyi"):
            path = out_root / rel
            text = path.read_text()
            if not text.startswith(STUB_HEADER):
                path.write_text(STUB_HEADER + text)


def check() -> int:
    """Regenerate into a temporary directory and compare with the checked-in files; 0 when identical."""
    stale = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        (tmp_root / "linlens" / "v1").mkdir(parents=True)
        generate(tmp_root)
        for rel in GENERATED:
            fresh = (tmp_root / rel).read_text()
            current_path = OUT_ROOT / rel
            current = current_path.read_text() if current_path.exists() else ""
            if fresh != current:
                stale = True
                diff = difflib.unified_diff(
                    current.splitlines(keepends=True),
                    fresh.splitlines(keepends=True),
                    fromfile=f"client/{rel} (checked in)",
                    tofile=f"client/{rel} (regenerated)",
                )
                sys.stdout.writelines(list(diff)[:200])
    if stale:
        print("generated code is stale: run `python scripts/gen_protos.py`", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail (exit 1) if the checked-in code is stale")
    options = parser.parse_args(argv)
    if options.check:
        return check()
    (OUT_ROOT / "linlens" / "v1").mkdir(parents=True, exist_ok=True)
    generate(OUT_ROOT)
    for rel in GENERATED:
        print(f"wrote client/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
