"""The ``sts`` command: ``serve``, ``dev``, ``workload-api``, ``svid``, ``policy check``, ``keys create``,
``audit verify``.

Exit codes: 0 success (for ``policy check``: allowed), 1 a negative answer (denied, audit chain
broken), 2 a usage or configuration error, with a message naming the key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sts.config import CONFIG_ENV, Settings, load_settings
from sts.errors import ConfigError, StsError
from sts.logsafe import configure_logging
from sts.netcheck import check_port_free
from sts.policy import BINDINGS, CLIENT_AUTH_METHODS

log = logging.getLogger("sts")

EXIT_OK, EXIT_NO, EXIT_CONFIG = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_CONFIG
    try:
        return int(args.run(args))
    except ConfigError as e:
        print(f"sts: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (StsError, OSError) as e:  # a start-up failure (keys, store, bundles): one line, no traceback
        print(f"sts: cannot start: {e}", file=sys.stderr)
        return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sts", description="SPIFFE workload-identity token exchange server")
    commands = parser.add_subparsers(title="commands")

    serve = commands.add_parser("serve", help="run the token exchange server")
    serve.add_argument("--config", type=Path, required=True, help="the YAML configuration file")
    serve.set_defaults(run=_serve)

    policy = commands.add_parser("policy", help="policy tools").add_subparsers(title="policy commands")
    check = policy.add_parser("check", help="print the decision for one request and why")
    check.add_argument("--config", type=Path, required=True)
    check.add_argument("--spiffe-id", required=True, help="the workload's SPIFFE ID")
    target = check.add_mutually_exclusive_group(required=True)
    target.add_argument("--audience", help="catalog id of the target")
    target.add_argument("--resource", help="resource URI of the target")
    check.add_argument("--scope", required=True, help="space-separated scopes")
    check.add_argument("--actor", help="SPIFFE ID of an acting party (delegation)")
    check.add_argument("--client-auth", default="none", choices=sorted(CLIENT_AUTH_METHODS))
    check.add_argument("--binding", default="none", choices=sorted(BINDINGS), help="token binding to assume")
    check.set_defaults(run=_policy_check)

    keys = commands.add_parser("keys", help="signing key tools").add_subparsers(title="key commands")
    create = keys.add_parser("create", help="provision a new production signing key per token class")
    create.add_argument("--config", type=Path, required=True)
    create.set_defaults(run=_keys_create)

    dev = commands.add_parser("dev", help="the development Workload API server and the STS together")
    dev.add_argument(
        "--state-dir", type=Path, default=Path("state/dev"), help="keys, database, sockets, dev.json"
    )
    dev.add_argument("--port", type=int, default=8443)
    dev.set_defaults(run=_dev)

    demo = commands.add_parser("demo", help="play the whole agent story against sts dev, step by step")
    demo.add_argument(
        "--state-dir", type=Path, default=None, help="of a running `sts dev` (default: start a private one)"
    )
    demo.set_defaults(run=_demo)

    workload_api = commands.add_parser("workload-api", help="run the development Workload API server alone")
    workload_api.add_argument("--config", type=Path, required=True, help="workload registration YAML")
    workload_api.add_argument("--state-dir", type=Path, default=Path("state/workload-api"))
    workload_api.set_defaults(run=_workload_api)

    svid = commands.add_parser("svid", help="fetch a JWT-SVID from a Workload API socket and print it")
    svid.add_argument("--socket", required=True, help="unix:///path/to/workload.sock")
    svid.add_argument("--audience", required=True)
    svid.set_defaults(run=_svid)

    audit = commands.add_parser("audit", help="audit log tools").add_subparsers(title="audit commands")
    verify = audit.add_parser("verify", help="check the hash chains of an audit log")
    verify.add_argument("file", type=Path)
    verify.set_defaults(run=_audit_verify)
    return parser


def _settings(path: Path) -> Settings:
    settings = load_settings(path)
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _serve(args: argparse.Namespace) -> int:
    """Check everything in this process (keys made, policies validated), then start the workers."""
    from sts.runtime import build_services

    settings = _settings(args.config)
    check_port_free(settings.listen.host, settings.listen.port, "listen.port")
    services = build_services(settings, connect=False)  # checks everything; workers connect themselves
    services.close()
    if settings.listen.tls is not None:
        from sts.web.tls_server import serve_tls

        log.info("serving %s with TLS on %s", settings.issuer, settings.listen.tls.public_url)
        return serve_tls(args.config.resolve(), settings)
    os.environ[CONFIG_ENV] = str(args.config.resolve())
    log.info(
        "serving %s on http://%s:%s with %d workers",
        settings.issuer,
        settings.listen.host,
        settings.listen.port,
        settings.server.workers,
    )
    _uvicorn(settings)
    return EXIT_OK


def _uvicorn(settings: Settings) -> None:
    """uvicorn (httptools on uvloop), one event loop per worker, with the deadlines of ``server:``.

    ``limit_concurrency`` bounds the connections a worker holds (slow ones included): past it
    uvicorn answers 503 at once instead of queueing. HTTP/1.1 only; no websockets. On SIGINT or
    SIGTERM requests in flight get ``server.drain_timeout`` to finish; the supervisor then kills any
    worker still alive (uvicorn's own supervisor would wait for it forever).
    """
    import uvicorn

    from sts.web.asgi import DeadlineHttpToolsProtocol

    server = settings.server
    config = uvicorn.Config(
        "sts.web.asgi:create_asgi_app_from_env",
        factory=True,
        host=settings.listen.host,
        port=settings.listen.port,
        workers=server.workers,
        loop="uvloop",
        http=DeadlineHttpToolsProtocol,
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        limit_concurrency=server.max_connections,
        backlog=min(max(1024, server.max_connections), 65535),
        timeout_keep_alive=server.header_timeout,
        timeout_graceful_shutdown=server.drain_timeout,
    )
    if server.workers == 1:
        uvicorn.Server(config).run()
        return
    from sts.web.supervisor import BoundedMultiprocess

    sock = config.bind_socket()
    try:
        BoundedMultiprocess(config, sockets=[sock], drain_seconds=server.drain_timeout).run()
    finally:
        sock.close()


def _policy_check(args: argparse.Namespace) -> int:
    from sts.policy import CedarPolicy, PolicyRequest, explain
    from sts.spiffeid import SpiffeId, SpiffeIdError

    settings = _settings(args.config)
    policy = CedarPolicy.from_directory(settings.policy_dir, settings.catalog)
    try:
        principal = SpiffeId.parse(args.spiffe_id)
        actor = SpiffeId.parse(args.actor) if args.actor else None
    except SpiffeIdError as e:
        print(f"sts: not a SPIFFE ID: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        entry = settings.catalog.resolve(
            [args.audience] if args.audience else [], [args.resource] if args.resource else []
        )
        scopes = settings.catalog.check_scopes(entry, frozenset(args.scope.split()))
    except StsError as e:
        print(f"DENY ({e.error}): {e.description}")
        return EXIT_NO
    request = PolicyRequest(
        principal=principal,
        target=entry,
        scopes=scopes,
        now=int(time.time()),
        client_auth=args.client_auth,
        binding=args.binding,
        actor=actor,
    )
    decision = policy.decide(request)
    print(explain(decision, request, policy.origins))
    return EXIT_OK if decision.allowed else EXIT_NO


def _keys_create(args: argparse.Namespace) -> int:
    from sts.keys import create_provisioned_keys

    settings = _settings(args.config)
    for kid in create_provisioned_keys(settings.keys):
        print(kid)
    return EXIT_OK


def _dev(args: argparse.Namespace) -> int:
    from sts.dev.environment import run

    configure_logging("INFO")
    return run(args.state_dir, args.port)


def _demo(args: argparse.Namespace) -> int:
    """Exit 0 only if every step of the story behaved as it must (``sts.dev.story``)."""
    from sts.dev.story import run

    configure_logging("WARNING")
    return run(args.state_dir)


def _workload_api(args: argparse.Namespace) -> int:
    from spire.server import serve

    configure_logging("INFO")
    serve(args.config, args.state_dir)
    return EXIT_OK


def _svid(args: argparse.Namespace) -> int:
    """Like ``spire-agent api fetch jwt``: the caller's JWT-SVID for one audience, via py-spiffe."""
    from spiffe import WorkloadApiClient
    from spiffe.errors import PySpiffeError

    try:
        with WorkloadApiClient(socket_path=args.socket) as client:
            print(client.fetch_jwt_svid(audience={args.audience}, timeout=10).token)
    except PySpiffeError as e:
        print(f"sts: cannot fetch a JWT-SVID from {args.socket}: {e}", file=sys.stderr)
        return EXIT_NO
    return EXIT_OK


def _audit_verify(args: argparse.Namespace) -> int:
    from sts.audit import verify_chain

    try:
        lines = args.file.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as e:
        print(f"sts: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    problems = verify_chain(lines)
    for problem in problems:
        print(problem)
    print(f"{len(lines)} records, {'intact' if not problems else f'{len(problems)} problems'}")
    return EXIT_OK if not problems else EXIT_NO


if __name__ == "__main__":
    sys.exit(main())
