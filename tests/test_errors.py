"""The exception tree: hierarchy (as documented), pickling (the launcher passes errors between processes), text."""

from __future__ import annotations

import builtins
import errno
import pickle
import re

import pytest

import fsrdzv
from fsrdzv import _errors
from fsrdzv._errors import (
    ConfigurationError,
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousStateError,
    RendezvousTimeoutError,
    SchemaVersionError,
    StateCorruptError,
    StorageError,
    TamperedError,
    UnsupportedStoreError,
)

ALL: list[type[Exception]] = [getattr(_errors, name) for name in _errors.__all__]
MESSAGE = "rendezvous 'job-7' at /shared/rdzv: something went wrong; run 'fsrdzv status'"


def test_every_error_is_exported_from_the_package() -> None:
    assert len(ALL) == 12
    for cls in ALL:
        assert getattr(fsrdzv, cls.__name__) is cls
        assert cls.__name__ in fsrdzv.__all__
        assert cls.__module__ == "fsrdzv._errors"


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_pickles(cls: type[Exception], protocol: int) -> None:
    error = cls(MESSAGE)
    copy = pickle.loads(pickle.dumps(error, protocol=protocol))
    assert type(copy) is cls
    assert str(copy) == str(error) == MESSAGE
    assert copy.args == error.args


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_pickles_when_raised_with_a_cause(cls: type[Exception]) -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise cls(MESSAGE) from inner
    except cls as error:
        copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls and str(copy) == MESSAGE


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_str_and_repr(cls: type[Exception]) -> None:
    error = cls(MESSAGE)
    assert str(error) == MESSAGE
    assert repr(error).startswith(f"{cls.__name__}(") and MESSAGE in repr(error)
    assert cls.__doc__ and cls.__doc__.strip(), "every error documents what it means"


def test_storage_error_keeps_errno_through_pickle() -> None:
    error = StorageError(errno.ENOSPC, "No space left on device", "/shared/rdzv/job/doc")
    assert str(error) == "[Errno 28] No space left on device: '/shared/rdzv/job/doc'"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is StorageError
    assert (copy.errno, copy.strerror, copy.filename) == (errno.ENOSPC, "No space left on device", error.filename)
    assert str(copy) == str(error)


HIERARCHY: list[tuple[type[Exception], tuple[type[BaseException], ...]]] = [
    (RendezvousError, (Exception,)),
    (RendezvousClosedError, (RendezvousError,)),
    (RendezvousGracefulExitError, (RendezvousError,)),
    (RendezvousTimeoutError, (RendezvousError, TimeoutError)),
    (RendezvousConnectionError, (RendezvousError, ConnectionError)),
    (StorageError, (RendezvousConnectionError, RendezvousError, OSError)),
    (RendezvousStateError, (RendezvousError,)),
    (StateCorruptError, (RendezvousStateError,)),
    (SchemaVersionError, (RendezvousStateError,)),
    (TamperedError, (RendezvousStateError,)),
    (ConfigurationError, (RendezvousError, ValueError)),
    (UnsupportedStoreError, (ConfigurationError, ValueError)),
]


@pytest.mark.parametrize(("cls", "parents"), HIERARCHY, ids=[c.__name__ for c, _ in HIERARCHY])
def test_hierarchy(cls: type[Exception], parents: tuple[type[BaseException], ...]) -> None:
    for parent in parents:
        assert issubclass(cls, parent)
    assert issubclass(cls, RendezvousError)


def test_catching_by_builtin_category() -> None:
    with pytest.raises(TimeoutError):
        raise RendezvousTimeoutError("join timed out")
    with pytest.raises(ValueError, match="bad"):
        raise ConfigurationError("bad")
    with pytest.raises(OSError, match="disk"):
        raise StorageError("disk full")
    with pytest.raises(RendezvousConnectionError):
        raise StorageError("disk full")
    with pytest.raises(ConnectionError):
        raise StorageError("disk full")


def test_siblings_are_distinct() -> None:
    """The categories callers branch on do not overlap."""
    assert not issubclass(StateCorruptError, SchemaVersionError)
    assert not issubclass(TamperedError, StateCorruptError)
    assert not issubclass(RendezvousClosedError, RendezvousGracefulExitError)
    assert not issubclass(RendezvousGracefulExitError, RendezvousClosedError)
    assert not issubclass(RendezvousStateError, OSError)
    assert not issubclass(ConfigurationError, OSError)
    assert not issubclass(RendezvousClosedError, OSError)


def test_documented_tree_matches_the_classes() -> None:
    """The tree drawn in the module docstring is the real one, '(also X)' included."""
    doc = _errors.__doc__ or ""
    lines = [line for line in doc.splitlines() if re.search(r"(├──|└──|^\s+RendezvousError)", line)]
    assert lines
    stack: list[tuple[int, type[BaseException]]] = []
    seen = set()
    for line in lines:
        match = re.search(r"([A-Z]\w+)(\s+\(also (\w+)\))?", line)
        assert match
        cls = getattr(_errors, match.group(1))
        depth = match.start(1)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            assert cls.__bases__[0] is stack[-1][1], f"{cls.__name__} is drawn under {stack[-1][1].__name__}"
        if match.group(3):
            assert issubclass(cls, getattr(builtins, match.group(3)))
        stack.append((depth, cls))
        seen.add(cls)
    assert seen == set(ALL)


def test_torch_names_are_all_there() -> None:
    """fsrdzv.torchrun maps these one to one onto torch's classes of the same names."""
    for name in ("RendezvousError", "RendezvousClosedError", "RendezvousTimeoutError", "RendezvousConnectionError",
                 "RendezvousStateError", "RendezvousGracefulExitError"):  # fmt: skip
        assert issubclass(getattr(fsrdzv, name), Exception)
