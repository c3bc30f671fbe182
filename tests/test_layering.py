"""Static checks over the source tree (ast, no imports).

1. Nothing under fedft/ except fedft/transport/ imports flwr, grpc or generated *_pb2 code.
2. Nowhere in fedft/, server/ or client/: a pickle import, ``torch.load`` without
   ``weights_only=True``, ``eval(``/``exec(``, ``yaml.load(``, or ``allow_pickle=True``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRANSPORT = ROOT / "fedft" / "transport"
WIRE_PACKAGES = {"flwr", "grpc", "grpc_tools", "google.protobuf"}
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}


def _py_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py"))


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted module) for every import; ``from x import y`` yields x and x.y."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}".lstrip(".")) for a in node.names]
    return out


def _matches(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def wire_import_violations(source: str, name: str) -> list[str]:
    """Imports of Flower / gRPC / protobuf / *_pb2 code in a module outside transport."""
    bad = []
    for line, module in _imported(ast.parse(source, filename=name)):
        last = module.rsplit(".", 1)[-1]
        if any(_matches(module, p) for p in WIRE_PACKAGES) or last.endswith(("_pb2", "_pb2_grpc")):
            bad.append(f"{name}:{line}: imports {module}")
    return bad


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def unsafe_violations(source: str, name: str) -> list[str]:
    """Unsafe deserialisation or code evaluation in one module."""
    tree = ast.parse(source, filename=name)
    bad = [
        f"{name}:{line}: imports {module}"
        for line, module in _imported(tree)
        if any(_matches(module.lstrip("."), p) for p in PICKLE_MODULES)
    ]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        where = f"{name}:{node.lineno}"
        if func in ("eval", "exec", "builtins.eval", "builtins.exec"):
            bad.append(f"{where}: calls {func}()")
        elif func == "torch.load" and not _kw_true(node, "weights_only"):
            bad.append(f"{where}: torch.load without weights_only=True")
        elif func in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            bad.append(f"{where}: calls {func}() (use yaml.safe_load)")
        elif _kw_true(node, "allow_pickle"):
            bad.append(f"{where}: allow_pickle=True")
    return bad


def test_only_transport_touches_flower_grpc_and_protobuf() -> None:
    files = [p for p in _py_files("fedft") if TRANSPORT not in p.parents]
    assert files, "no library files found: is ROOT right?"
    bad = [
        v
        for p in files
        for v in wire_import_violations(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))
    ]
    assert not bad, "move these imports into fedft/transport/:\n" + "\n".join(bad)


def test_no_pickle_eval_or_unsafe_loads() -> None:
    files = _py_files("fedft", "server", "client")
    bad = [
        v
        for p in files
        for v in unsafe_violations(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))
    ]
    assert not bad, "unsafe code:\n" + "\n".join(bad)


# The checkers must catch what they claim to catch, or the two tests above prove nothing.
@pytest.mark.parametrize(
    "source",
    [
        "import flwr",
        "from flwr.app import ArrayRecord",
        "import grpc.aio as g",
        "from google.protobuf import message",
        "from fedft.transport._gen.fedft.split.v1 import split_pb2",
        "from .split_pb2_grpc import SplitStub",
        "def f():\n    import flwr.common.serde\n",
    ],
)
def test_wire_checker_flags(source: str) -> None:
    assert wire_import_violations(source, "x.py")


@pytest.mark.parametrize(
    "source",
    [
        "import fedft.transport.serde as s",  # the transport package itself is fine
        "from fedft.types import LoraFactors",
        "import grpcx",
        "from flwrish import x",
    ],
)
def test_wire_checker_allows(source: str) -> None:
    assert not wire_import_violations(source, "x.py")


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "from pickle import loads",
        "import cloudpickle as cp",
        "x = torch.load(path)",
        "x = torch.load(path, weights_only=False)",
        "x = eval('1 + 1')",
        "exec(code)",
        "cfg = yaml.load(stream)",
        "a = np.load(f, allow_pickle=True)",
    ],
)
def test_unsafe_checker_flags(source: str) -> None:
    assert unsafe_violations(source, "x.py")


@pytest.mark.parametrize(
    "source",
    [
        "x = torch.load(path, weights_only=True, map_location='cpu')",
        "cfg = yaml.safe_load(stream)",
        "model.eval()",
        "a = np.load(f, allow_pickle=False)",
        "from safetensors.torch import load_file",
    ],
)
def test_unsafe_checker_allows(source: str) -> None:
    assert not unsafe_violations(source, "x.py")
