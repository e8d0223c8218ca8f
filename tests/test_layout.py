"""The package's shape: size budgets, layering rules and the test harness's own promises.

Budgets keep every part of the library small enough to read in one sitting: at most 400 lines per module and 250
lines per class (complexity is held by ruff's C90 at 12, private access across modules by SLF001). The layering
rules say who may write the rendezvous document: only the engine and ``_admin`` apply protocol transitions, so the
faces (CLI, launcher) import neither the protocol nor the state codec.
"""

from __future__ import annotations

import ast
import pathlib
import time

import pytest

from tests.nodes import Node

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fsrdzv"
MODULE_BUDGET = 400
CLASS_BUDGET = 250
#: Modules (or packages) that present the library to users and must not decide protocol questions themselves.
FACES = ("_cli", "_launcher", "_roundcheck")
FORBIDDEN_IN_FACES = {"_protocol": None, "_state": {"encode_state", "decode_state"}}


def _modules() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _ids(paths: list[pathlib.Path]) -> list[str]:
    return [str(p.relative_to(PACKAGE)) for p in paths]


@pytest.mark.parametrize("path", _modules(), ids=_ids(_modules()))
def test_module_within_budget(path: pathlib.Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MODULE_BUDGET, f"{path.relative_to(PACKAGE)} has {lines} lines (budget {MODULE_BUDGET}): split it"


@pytest.mark.parametrize("path", _modules(), ids=_ids(_modules()))
def test_classes_within_budget(path: pathlib.Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno is not None
            size = node.end_lineno - node.lineno + 1
            assert size <= CLASS_BUDGET, f"class {node.name} in {path.name} has {size} lines (budget {CLASS_BUDGET})"


def _face_modules() -> list[pathlib.Path]:
    out = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0].removesuffix(".py") in FACES:
            out.append(path)
    return out


@pytest.mark.parametrize("path", _face_modules(), ids=_ids(_face_modules()))
def test_faces_do_not_write_the_document_themselves(path: pathlib.Path) -> None:
    """The CLI and the launcher change the document only through the library's one writer path (``_admin``)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            module = node.module.split(".")[-1]
            if module not in FORBIDDEN_IN_FACES:
                continue
            names = FORBIDDEN_IN_FACES[module]
            imported = {alias.name for alias in node.names}
            bad = imported if names is None else imported & names
            assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)} from {node.module}"
        if isinstance(node, ast.ImportFrom) and node.module is None:
            # ``from . import _protocol``
            bad = {alias.name for alias in node.names} & {m for m, names in FORBIDDEN_IN_FACES.items() if names is None}
            assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_testing_harness_patches_no_module() -> None:
    """``fsrdzv.testing`` injects time and faults through parameters, never by setting attributes of fsrdzv."""
    for path in sorted((PACKAGE / "testing").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
                pytest.fail(f"{path.relative_to(PACKAGE)}:{node.lineno} calls setattr")
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                        # Private modules are imported as ``_name``: assigning one of their attributes patches them.
                        owner = target.value.id
                        assert not owner.startswith("_"), (
                            f"{path.relative_to(PACKAGE)}:{node.lineno} assigns {owner}.{target.attr}"
                        )


def test_production_code_reads_no_test_hook() -> None:
    """No environment switch or import of the test harness in the library itself."""
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "testing":
            continue
        text = path.read_text()
        assert "FSRDZV_DOCTOR_FAULT" not in text, rel
        assert "corrupt_for_tests" not in text, rel
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                assert not node.module.endswith("testing"), f"{rel} imports {node.module}"


def test_wait_for_notices_a_dead_node(tmp_path: pathlib.Path) -> None:
    """A node that dies makes wait_for fail at once, not after its whole timeout."""
    node = Node(str(tmp_path), "dead-node", 2, 2)
    node.wait_for("joining", 30)
    node.kill()
    start = time.monotonic()
    with pytest.raises(AssertionError, match="exited"):
        node.wait_for("rank", 60)
    assert time.monotonic() - start < 10
