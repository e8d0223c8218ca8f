"""``--rdzv-conf`` parsing: torch's ``RendezvousParameters`` validated for fsrdzv, with one-line errors.

The rendezvous settings go through :meth:`fsrdzv.Settings.from_mapping`, the same validation as
:func:`fsrdzv.create_handler` and ``fsrdzv run``. Storage options keep a table of their own here, for two reasons
the stores cannot serve: torchrun prints every ``--rdzv-conf`` value in its start-up log (and they show in ``ps``),
so credentials must be refused here although the stores accept them from Python; and text values need their
kind (``anon=0`` is False, not the string ``"0"``) before an SDK sees them.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from torch.distributed.elastic.rendezvous import RendezvousParameters

from .. import _errors as fe
from .._scaleup import DEFAULT_MAX_DELAY, ScaleUpPolicy
from .._secret import read_secret_file
from .._settings import COUNT_KEYS, DEFAULTS, SECONDS_KEYS, Settings, parse_bool, parse_seconds, set_nested
from .._stores import split_endpoint

__all__ = ["DEFAULT_STORE_TIMEOUT", "TorchrunConfig", "parse_config", "worker_variables"]

#: torch's c10d backend uses 60 s for its TCPStore; the agent's blocking gets (worker rank assignment) and the
#: clients' connection retries while rank 0's server comes up both run under this timeout.
DEFAULT_STORE_TIMEOUT: Final = 60.0

#: Named in every error message about a value.
_SOURCE: Final = "--rdzv-conf"
#: Keys torchrun or torch add on their own; fsrdzv has no use for them.
_IGNORED_KEYS: Final = frozenset({"timeout"})
#: fsrdzv's own keys (not storage specific).
_OWN_KEYS: Final = frozenset({"read_timeout", "secret_file", "scale_up_at", "scale_up_max_delay"})


def _parse_str(key: str, value: object, *, source: str = "") -> str:
    if not isinstance(value, str) or not value.strip():
        raise fe.ConfigurationError(f"invalid {source} value {key}={value!r}: expected a non-empty string")
    return value.strip()


_Parser = Callable[..., object]
_BOOL: Final[_Parser] = parse_bool
_SECONDS: Final[_Parser] = parse_seconds
_STR: Final[_Parser] = _parse_str

# Storage options accepted in --rdzv-conf, per endpoint scheme: key -> (parser, where it goes). A path "a.b" puts
# the value under storage_options["a"]["b"]. Credentials are deliberately absent (see the module docstring); the
# stores read them from the environment (AWS_*, AZURE_*, GOOGLE_APPLICATION_CREDENTIALS), and the job secret comes
# from a file (secret_file=).
_STORAGE_KEYS: Final[dict[str, dict[str, tuple[_Parser, str]]]] = {
    "file": {
        "lock": (_BOOL, "lock"),
        "lock_timeout": (_SECONDS, "lock_timeout"),
        "permissions": (_STR, "permissions"),
        "fsync": (_BOOL, "fsync"),
    },
    "s3": {
        "endpoint_url": (_STR, "endpoint_url"),
        "region_name": (_STR, "client_kwargs.region_name"),
        "region": (_STR, "client_kwargs.region_name"),
        "profile": (_STR, "profile"),
        "anon": (_BOOL, "anon"),
        "skip_selftest": (_BOOL, "skip_selftest"),
    },
    "gs": {
        "endpoint_url": (_STR, "endpoint_url"),
        "project": (_STR, "project"),
        "token": (_STR, "token"),  # gcsfs's token *kinds* ("anon", "google_default", a key file path), not a secret
        "retry_timeout": (_SECONDS, "retry_timeout"),
        "skip_selftest": (_BOOL, "skip_selftest"),
    },
    "az": {
        "account_name": (_STR, "account_name"),
        "account_host": (_STR, "account_host"),
        "account_url": (_STR, "account_url"),
        "endpoint_url": (_STR, "account_url"),
        "anon": (_BOOL, "anon"),
        "skip_selftest": (_BOOL, "skip_selftest"),
    },
}
_SCHEME_FAMILY: Final = {"gcs": "gs", "abfs": "az", "abfss": "az"}


@dataclass(frozen=True)
class TorchrunConfig:
    """Everything :func:`handler_creator` takes from torch's ``RendezvousParameters``, validated."""

    endpoint: str
    run_id: str
    min_nodes: int
    max_nodes: int
    local_addr: str | None = None
    join_timeout: float = DEFAULTS["join_timeout"]
    last_call_timeout: float = DEFAULTS["last_call_timeout"]
    close_timeout: float = DEFAULTS["close_timeout"]
    heartbeat_timeout: float = DEFAULTS["heartbeat_timeout"]
    keep_alive_interval: float = DEFAULTS["keep_alive_interval"]
    keep_alive_max_attempt: int = int(DEFAULTS["keep_alive_max_attempt"])
    store_timeout: float = DEFAULT_STORE_TIMEOUT
    storage_options: dict[str, Any] = field(default_factory=dict)
    secret: bytes | None = field(default=None, repr=False)
    #: The file the secret came from (the workers get the path, for :func:`fsrdzv.safe_point`).
    secret_file: str | None = None
    scale_up_at: str = "any_time"
    scale_up_max_delay: float = DEFAULT_MAX_DELAY

    def handler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`fsrdzv.create_handler`."""
        return {
            "local_addr": self.local_addr,
            "storage_options": self.storage_options,
            "join_timeout": self.join_timeout,
            "last_call_timeout": self.last_call_timeout,
            "close_timeout": self.close_timeout,
            "heartbeat_timeout": self.heartbeat_timeout,
            "keep_alive_interval": self.keep_alive_interval,
            "keep_alive_max_attempt": self.keep_alive_max_attempt,
            "secret": self.secret,
            "scale_up_at": self.scale_up_at,
            "scale_up_max_delay": self.scale_up_max_delay,
        }


def _read_secret(key: str, value: object) -> bytes:
    path = os.path.expanduser(_parse_str(key, value, source=_SOURCE))
    try:
        return read_secret_file(path)
    except fe.ConfigurationError as exc:
        raise fe.ConfigurationError(f"invalid {_SOURCE} value {key}={value!r}: {exc}") from None


def _unknown_key(key: str, value: object, scheme: str, known: set[str]) -> fe.ConfigurationError:
    hint = difflib.get_close_matches(key, sorted(known), n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ";"
    return fe.ConfigurationError(
        f"unknown {_SOURCE} key {key!r} (value {value!r}) for the fsrdzv backend with a {scheme}:// "
        f"endpoint{suggestion} Known keys: {', '.join(sorted(known))}"
    )


def parse_config(params: RendezvousParameters) -> TorchrunConfig:
    """Validate torch's ``RendezvousParameters`` for fsrdzv.

    :raises fsrdzv.ConfigurationError: (a ``ValueError``) an unknown key or a malformed value, naming both.
    """
    scheme, _ = split_endpoint(params.endpoint)
    storage_keys = _STORAGE_KEYS.get(_SCHEME_FAMILY.get(scheme, scheme), {})
    known = {*SECONDS_KEYS, *COUNT_KEYS, *_OWN_KEYS, *storage_keys}
    conf: Mapping[str, object] = params.config
    timings: dict[str, object] = {}
    storage_options: dict[str, Any] = {}
    for key, value in conf.items():
        if key in _IGNORED_KEYS or key in _OWN_KEYS:
            continue
        if key in SECONDS_KEYS or key in COUNT_KEYS:
            timings[key] = value
        elif key in storage_keys:
            parse, path = storage_keys[key]
            set_nested(storage_options, path, parse(key, value, source=_SOURCE))
        else:
            raise _unknown_key(key, value, scheme, known)
    settings = Settings.from_mapping(
        {"run_id": params.run_id, "min_nodes": params.min_nodes, "max_nodes": params.max_nodes, **timings},
        source=_SOURCE,
    )
    scale_up = ScaleUpPolicy.parse(
        conf.get("scale_up_at", "any_time"), conf.get("scale_up_max_delay", DEFAULT_MAX_DELAY), source=_SOURCE
    )
    secret_file = os.path.abspath(os.path.expanduser(str(conf["secret_file"]))) if "secret_file" in conf else None
    return TorchrunConfig(
        endpoint=params.endpoint,
        run_id=settings.run_id,
        min_nodes=settings.min_nodes,
        max_nodes=settings.max_nodes,
        local_addr=params.local_addr,
        join_timeout=settings.join_timeout,
        last_call_timeout=settings.last_call_timeout,
        close_timeout=settings.close_timeout,
        heartbeat_timeout=settings.heartbeat_timeout,
        keep_alive_interval=settings.keep_alive_interval,
        keep_alive_max_attempt=settings.keep_alive_max_attempt,
        store_timeout=(
            parse_seconds("read_timeout", conf["read_timeout"], source=_SOURCE)
            if "read_timeout" in conf
            else DEFAULT_STORE_TIMEOUT
        ),
        storage_options=storage_options,
        secret=_read_secret("secret_file", conf["secret_file"]) if "secret_file" in conf else None,
        secret_file=secret_file,
        scale_up_at=scale_up.at,
        scale_up_max_delay=scale_up.max_delay,
    )


def worker_variables(config: TorchrunConfig, node_id: str, flag_path: str | None) -> dict[str, str]:
    """The ``FSRDZV_*`` variables torchrun's workers get (for :func:`fsrdzv.safe_point`); no credential: the
    storage options of ``--rdzv-conf`` never hold one, and the secret travels as its file's path."""
    env = {"FSRDZV_ENDPOINT": config.endpoint, "FSRDZV_RUN_ID": config.run_id, "FSRDZV_NODE_ID": node_id}
    if config.storage_options:
        env["FSRDZV_STORAGE_OPTIONS"] = json.dumps(config.storage_options, sort_keys=True)
    if config.secret_file:
        env["FSRDZV_SECRET_FILE"] = config.secret_file
    if flag_path:
        env["FSRDZV_SAFE_POINT_FILE"] = flag_path
    return env
