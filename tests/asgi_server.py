"""A real ASGI app under uvicorn on loopback, in a thread, for the library tests (ASGI, MCP, async)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from sts.dev.story import free_port_pair

# RFC 6750 §3 challenge: a scheme, then name="value" pairs of printable ASCII without " and \.
_VALUE = r'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
CHALLENGE = re.compile(rf"^(Bearer|DPoP)( [a-z_]+={_VALUE}(, [a-z_]+={_VALUE})*)?$")


@contextmanager
def serving(app: Any, port: int | None = None) -> Iterator[str]:
    """``app`` under uvicorn (httptools, one event loop) on ``127.0.0.1``; yields its base URL."""
    port = port or free_port_pair()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not runner.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        runner.should_exit = True
        thread.join(timeout=10)


def parameters(challenge: str) -> dict[str, str]:
    """The parameters of one RFC 6750 challenge, which must be well-formed."""
    assert CHALLENGE.match(challenge), f"not an RFC 6750 §3 challenge: {challenge!r}"
    return dict(re.findall(r'([a-z_]+)="([^"]*)"', challenge))
