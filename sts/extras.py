"""The optional parts of the ``spiffe-sts`` distribution (its extras), and one message when one is missing.

``pip install spiffe-sts`` installs the libraries only: :mod:`sts.client` and :mod:`sts.verify`
(``cryptography``, ``pyjwt``, ``requests``, ``httpx``, ``anyio``, ``spiffe``). The rest are extras:

``server``  everything ``sts serve`` and ``sts dev`` need (Flask, uvicorn, h11, PyYAML, cedarpy,
            grpcio and protobuf for the development Workload API, redis, prometheus_client)
``flask``   :meth:`sts.verify.TokenVerifier.require_token` and ``init_app`` (Flask)
``asgi``    :mod:`sts.asgi_verifier` (Starlette, FastAPI)
``mcp``     :mod:`sts.mcp_verifier` (the MCP Python SDK)
``redis``   :class:`sts.verify.RedisReplayCache` (DPoP replay across resource-server replicas)

:func:`require_extra` checks that an extra's modules can be imported (without importing them) and
otherwise ends the process with exit 2 and the exact ``pip`` command. :func:`main` is the ``sts``
console script: it checks the extra the command needs before :mod:`sts.cli` (which imports the
server's modules) is imported, then runs ``sts.cli.main``.

Imports nothing of the project, and nothing outside the standard library: :mod:`sts.cli` may import
it (its ``main`` calls :func:`require_extras_for` too, for ``python -m sts.cli``); :func:`main` loads
``sts.cli`` by name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence

DISTRIBUTION = "spiffe-sts"  # pyproject.toml [project] name; the import package and command are sts
EXIT_MISSING_EXTRA = 2  # the exit code of every configuration or start-up error of the sts command
# The top-level modules each extra brings; present means installed (find_spec, nothing imported).
EXTRAS: Mapping[str, tuple[str, ...]] = {
    "server": (
        "flask", "uvicorn", "httptools", "uvloop", "h11", "yaml", "cedarpy", "grpc", "redis",
        "prometheus_client",
    ),
    "flask": ("flask",),
    "asgi": ("starlette", "fastapi"),
    "mcp": ("mcp",),
    "redis": ("redis",),
}
# sts commands and the extra each needs. Every command of sts.cli imports the server's modules
# (sts.config: PyYAML, sts.policy: cedarpy), so each is checked; `sts svid` needs only py-spiffe.
COMMAND_EXTRAS: Mapping[str, str] = {
    "serve": "server",
    "dev": "server",
    "demo": "server",
    "workload-api": "server",
    "config": "server",
    "policy": "server",
    "admin": "server",
    "keys": "server",
    "audit": "server",
}


def install_command(extra: str) -> str:
    """The one command that installs ``extra``: ``pip install 'spiffe-sts[server]'``."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (none: the extra is installed)."""
    if extra not in EXTRAS:
        raise ValueError(f"not an extra of {DISTRIBUTION}: {extra!r} (one of {', '.join(EXTRAS)})")
    return [name for name in EXTRAS[extra] if not _importable(name)]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_extra_message(extra: str, *, needed_by: str, missing: Sequence[str] = ()) -> str:
    """``<needed_by> needs the <extra> extra of spiffe-sts (missing: …); install it: pip install …``."""
    which = f" (missing: {', '.join(missing)})" if missing else ""
    return (
        f"{needed_by} needs the {extra} extra of {DISTRIBUTION}, which is not installed{which}; "
        f"install it: {install_command(extra)}"
    )


def require_extra(extra: str, *, command: str | None = None) -> None:
    """Return if ``extra`` is installed; else print one ``sts:`` line with the pip command, exit 2.

    ``command`` names what needs it in the message (default ``sts``), e.g. ``"sts serve"``.
    """
    missing = missing_modules(extra)
    if missing:
        message = missing_extra_message(extra, needed_by=command or "sts", missing=missing)
        print(f"sts: {message}", file=sys.stderr)
        raise SystemExit(EXIT_MISSING_EXTRA)


def command_of(argv: Sequence[str]) -> str | None:
    """The sub-command of an ``sts`` command line (its first argument that is not an option)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def require_extras_for(argv: Sequence[str]) -> None:
    """:func:`require_extra` for the extra the command in ``argv`` (without the program) needs."""
    command = command_of(argv)
    extra = COMMAND_EXTRAS.get(command) if command is not None else None
    if extra is not None:
        require_extra(extra, command=f"sts {command}")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``sts`` console script: the extra check, then :func:`sts.cli.main`."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    require_extras_for(arguments)
    try:
        # By name, as the console-script machinery itself would: sts.cli imports this module, and
        # the import graph of sts stays one-way (tests/test_layering.py).
        cli = importlib.import_module("sts.cli")
    except ModuleNotFoundError as e:  # sts --version, --help: sts.cli itself needs the server extra
        needed = e.name or "a module of the server"
        print(f"sts: {missing_extra_message('server', needed_by='sts', missing=[needed])}", file=sys.stderr)
        return EXIT_MISSING_EXTRA
    return int(cli.main(arguments))
