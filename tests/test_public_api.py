"""The public surface of ``fsrdzv``: ``__all__``, the names the issue promises, and a light import."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import pathlib
import subprocess
import sys

import fsrdzv

INIT = pathlib.Path(fsrdzv.__file__)


def module_level_names() -> set[str]:
    """Every name ``fsrdzv/__init__.py`` binds at module level."""
    tree = ast.parse(INIT.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.module != "__future__":
                names |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_all_is_sorted_and_unique() -> None:
    assert fsrdzv.__all__ == sorted(fsrdzv.__all__)
    assert len(set(fsrdzv.__all__)) == len(fsrdzv.__all__)


def test_all_is_complete() -> None:
    public = {n for n in module_level_names() if not n.startswith("_")} | {"__version__"}
    assert public == set(fsrdzv.__all__)


def test_every_name_in_all_is_importable() -> None:
    namespace: dict[str, object] = {}
    exec("from fsrdzv import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(fsrdzv.__all__)
    for name in fsrdzv.__all__:
        assert getattr(fsrdzv, name) is namespace[name]


def test_version() -> None:
    assert isinstance(fsrdzv.__version__, str) and fsrdzv.__version__.count(".") >= 1


def test_public_objects_are_documented() -> None:
    for name in fsrdzv.__all__:
        obj = getattr(fsrdzv, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert (obj.__doc__ or "").strip(), f"fsrdzv.{name} has no docstring"


def test_create_handler_signature_matches_the_issue() -> None:
    params = inspect.signature(fsrdzv.create_handler).parameters
    assert list(params)[:4] == ["endpoint", "run_id", "min_nodes", "max_nodes"]
    assert all(params[p].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in list(params)[:4])
    defaults = {
        "local_addr": None,
        "storage_options": None,
        "join_timeout": 600,
        "last_call_timeout": 30,
        "close_timeout": 30,
        "keep_alive_interval": 5,
        "keep_alive_max_attempt": 3,
    }
    for name, default in defaults.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name


def test_rendezvous_info_fields() -> None:
    assert dataclasses.is_dataclass(fsrdzv.RendezvousInfo)
    fields = {f.name for f in dataclasses.fields(fsrdzv.RendezvousInfo)}
    assert {"round", "rank", "world_size", "master_addr", "master_port", "participants"} <= fields


def test_handler_methods() -> None:
    handler = fsrdzv.RendezvousHandler
    for name in (
        "next_rendezvous",
        "num_nodes_waiting",
        "is_closed",
        "set_closed",
        "shutdown",
        "__enter__",
        "__exit__",
    ):
        assert callable(getattr(handler, name)), name
    assert isinstance(inspect.getattr_static(handler, "run_id"), property)


HEAVY = ["torch", "s3fs", "adlfs", "gcsfs", "google", "azure", "botocore", "boto3", "aiobotocore", "moto", "numpy"]


def test_import_is_light() -> None:
    """``import fsrdzv`` pulls in no ML framework and no cloud SDK (they load lazily, on first use)."""
    code = (
        "import json, sys, fsrdzv\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps(sorted({m for m in sys.modules if m.split('.')[0] in heavy or m == 'fsrdzv.torchrun'})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(result.stdout) == []


def test_safe_point_is_public_torch_free_and_a_no_op_outside_an_agent() -> None:
    """``fsrdzv.safe_point()`` (issue 14 §1): importable without torch, no arguments, False when no agent asks."""
    assert list(inspect.signature(fsrdzv.safe_point).parameters) == []
    code = (
        "import json, os, sys, fsrdzv\n"
        "os.environ.pop('FSRDZV_SAFE_POINT_FILE', None)\n"
        "print(json.dumps([fsrdzv.safe_point(), 'torch' in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(result.stdout) == [False, False]
