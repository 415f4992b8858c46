"""The pure core imports no grpc; the round machine imports no I/O at all."""

import ast
import inspect
import subprocess
import sys

import pytest

from paramserver import rounds


@pytest.mark.parametrize(
    "module",
    ["paramserver.rounds", "paramserver.averaging", "paramserver.codec",
     "paramserver.spool", "paramserver.training", "paramserver.wire", "paramserver.specs",
     "paramserver.journal", "paramserver.clock"],
)
def test_core_module_does_not_load_grpc(module: str) -> None:
    # A fresh interpreter: this test process has grpc loaded already.
    code = f"import sys, {module}; print('grpc' in sys.modules, 'grpc' in str(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["False", "False"], f"{module} loads grpc"


def test_round_machine_imports_only_pure_modules() -> None:
    tree = ast.parse(inspect.getsource(rounds))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "enum", "collections", "dataclasses", "typing",
                        "paramserver"}, imported
    assert "paramserver.errors" in {
        n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


@pytest.mark.parametrize("module", ["paramserver.specs", "paramserver.averaging",
                                    "paramserver.rounds"])
def test_the_pure_modules_load_no_protobuf(module: str) -> None:
    code = f"import sys, {module}; print(any(m.startswith('google.protobuf') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["False"], f"{module} loads protobuf"
