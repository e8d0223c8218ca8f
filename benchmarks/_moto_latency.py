"""moto's S3 server answering every request ``DELAY_MS`` later: a model of a service whose requests take a
real round trip (S3 Express answers in 14-26 ms, S3 Standard's conditional writes in about 60 ms), where the
emulator on loopback answers in a few milliseconds of its own CPU. The wait is a sleep, so it costs no CPU.

    python benchmarks/_moto_latency.py HOST PORT DELAY_MS
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple


def main() -> None:
    host, port, delay_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    app = DomainDispatcherApplication(create_backend_app)
    delay = delay_ms / 1000

    def delayed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        time.sleep(delay)
        answer: Iterable[bytes] = app(environ, start_response)
        return answer

    run_simple(host, port, delayed, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
