"""Issue 15 §4: what retrying cannot fix fails at once, on every face, with one line first."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

import fsrdzv


@pytest.mark.parametrize("endpoint", ["missing/below/a/missing", "plain-file"])
def test_shutdown_does_not_retry_a_permanent_error(tmp_path: Path, endpoint: str) -> None:
    (tmp_path / "plain-file").write_text("x")
    handler = fsrdzv.create_handler(str(tmp_path / endpoint), "r", 1, 1, join_timeout=5, close_timeout=30)
    start = time.monotonic()
    with pytest.raises(fsrdzv.StorageError):
        handler.next_rendezvous()
    assert handler.shutdown() is False
    # close_timeout is 30 s: a permanent error must not be retried until then.
    assert time.monotonic() - start < 5


def test_torchrun_configuration_error_is_logged_at_error_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("torch")
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from fsrdzv import torchrun

    params = RendezvousParameters("fsrdzv", str(tmp_path), "r", 1, 1, bogus_key="1")
    with caplog.at_level(logging.ERROR, logger="fsrdzv.torchrun"), pytest.raises(ValueError, match="bogus_key"):
        torchrun.create_handler(params)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "bogus_key" in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage()
