"""Start-up check that a listening address is free, so a second server fails instead of sharing it.

A server bound with SO_REUSEPORT would start "normally" next to another one on the same port and the
kernel would split connections between two different servers (issuers, keys, trust). Binding once
without SO_REUSEPORT (SO_REUSEADDR only, so connections in TIME_WAIT do not count) proves the
address is nobody's.
"""

from __future__ import annotations

import socket

from sts.errors import ConfigError


def check_port_free(host: str, port: int, setting: str) -> None:
    """Raise :class:`ConfigError` naming ``host:port`` and the ``setting`` to change when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family, reuse_port=False).close()
    except OSError as e:
        raise ConfigError(
            f"{setting}: cannot listen on {host}:{port}: {e.strerror or e} (another process has it?)"
        ) from e
