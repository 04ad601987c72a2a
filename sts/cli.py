"""The ``sts`` command: ``serve``, ``config check``, ``dev``, ``demo``, ``workload-api``, ``svid``,
``policy check``, ``keys create``, ``audit verify``, ``admin store-loss ack``; ``sts --version``.

Exit codes: 0 success (for ``policy check``: allowed), 1 a negative answer (denied, audit chain
broken), 2 a usage or configuration error, with a message naming the key.

Argument parsing and printing only: what a command does lives in the module it imports.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sts.audit_query import add_audit_query_commands
from sts.config import CONFIG_ENV, Settings, load_settings
from sts.errors import ConfigError, StsError
from sts.logsafe import configure_logging
from sts.netcheck import check_port_free
from sts.policy import BINDINGS, CLIENT_AUTH_METHODS, SUBJECT_TOKEN_CLASSES

log = logging.getLogger("sts")

EXIT_OK, EXIT_NO, EXIT_CONFIG = 0, 1, 2
DISTRIBUTION = "spiffe-sts"  # pyproject.toml [project] name (the command and package are sts)
SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"
DEFAULT_TASK_SECONDS = 3600


def main(argv: Sequence[str] | None = None) -> int:
    from sts.extras import require_extras_for  # `sts serve` without the server extra: exit 2, the pip command

    require_extras_for(sys.argv[1:] if argv is None else argv)
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


def version() -> str:
    """``sts <version>`` of the installed distribution."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return f"sts {installed_version(DISTRIBUTION)}"
    except PackageNotFoundError:
        return f"sts (version unknown: the {DISTRIBUTION} distribution is not installed)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's ``(default: …)``, except where there is none to show (None, False, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == "" or action.required:
            return action.help
        return super()._get_help_string(action)


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    text: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=text, description=description or text, formatter_class=_HelpFormatter
    )


def _config_option(parser: argparse.ArgumentParser, text: str = "the YAML configuration file") -> None:
    parser.add_argument("--config", type=Path, required=True, metavar="FILE", help=text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sts",
        description="SPIFFE workload-identity token exchange server",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version())
    commands = parser.add_subparsers(title="commands")

    serve = _command(commands, "serve", "run the token exchange server")
    _config_option(serve)
    serve.set_defaults(run=_serve)

    config = _command(commands, "config", "configuration tools").add_subparsers(title="config commands")
    config_check = _command(
        config,
        "check",
        "check a configuration as sts serve would, and print what it found",
        "Load the settings, the policies, the trust bundles from files and the signing keys, and "
        "parse the store URL, as sts serve does before it starts workers, without changing anything "
        "(no key is created or rotated, nothing is connected to). Exit 0 when sts serve would start, "
        "2 with one line per problem otherwise.",
    )
    _config_option(config_check)
    config_check.set_defaults(run=_config_check)

    policy = _command(commands, "policy", "policy tools").add_subparsers(title="policy commands")
    check = _command(
        policy,
        "check",
        "print the decision for one request and why",
        "Ask the policies of a configuration what they decide for one exchange, given the context the "
        "exchange would give Cedar, and print ALLOW or DENY with the policies that decided it. Nothing "
        "is verified: the flags state what the exchange would have verified. Exit 0 allow, 1 deny.",
    )
    _policy_check_arguments(check)
    check.set_defaults(run=_policy_check)

    keys = _command(commands, "keys", "signing key tools").add_subparsers(title="key commands")
    create = _command(keys, "create", "provision a new production signing key per token class")
    _config_option(create)
    create.set_defaults(run=_keys_create)

    dev = _command(
        commands,
        "dev",
        "the development Workload API server and the STS together",
        "The development Workload API server and the STS together: the STS listens on 127.0.0.1:PORT "
        "(plain HTTP) and on 127.0.0.1:PORT+1 (TLS, optional client certificates).",
    )
    dev.add_argument(
        "--state-dir", type=Path, default=Path("state/dev"), help="keys, database, sockets, dev.json"
    )
    dev.add_argument(
        "--port",
        type=int,
        default=8443,
        help="the plain HTTP listener; the TLS (mTLS) listener uses --port + 1",
    )
    dev.add_argument(
        "--spire",
        action="store_true",
        help="on a real SPIRE server and agents (built by `make spire`; STS_SPIRE_BIN overrides) "
        "instead of the development Workload API server",
    )
    dev.set_defaults(run=_dev)

    demo = _command(commands, "demo", "play the whole agent story against sts dev, step by step")
    demo.add_argument(
        "--state-dir", type=Path, default=None, help="of a running `sts dev` (default: start a private one)"
    )
    demo.set_defaults(run=_demo)

    workload_api = _command(commands, "workload-api", "run the development Workload API server alone")
    _config_option(workload_api, "workload registration YAML")
    workload_api.add_argument(
        "--state-dir", type=Path, default=Path("state/workload-api"), help="CAs and sockets"
    )
    workload_api.set_defaults(run=_workload_api)

    svid = _command(commands, "svid", "fetch a JWT-SVID from a Workload API socket and print it")
    svid.add_argument(
        "--socket",
        metavar="unix:///PATH",
        help=f"the Workload API socket (default: ${SOCKET_ENV})",
    )
    svid.add_argument("--audience", required=True, help="the audience the JWT-SVID is for")
    svid.set_defaults(run=_svid)

    audit = _command(commands, "audit", "audit log tools").add_subparsers(title="audit commands")
    verify = _command(audit, "verify", "check the hash chains of an audit log")
    verify.add_argument("file", type=Path, help="the audit log (JSON lines)")
    verify.set_defaults(run=_audit_verify)
    add_audit_query_commands(audit)

    admin = _command(commands, "admin", "administrator actions on a running STS").add_subparsers(
        title="admin commands"
    )
    from sts.admin_cli import add_admin_commands

    add_admin_commands(admin)  # the live view, the kill switches, store-loss ack (sts.admin_cli)
    return parser


def _policy_check_arguments(check: argparse.ArgumentParser) -> None:
    """The request (``PolicyRequest``) and every context input the exchange gives Cedar."""
    _config_option(check)
    check.add_argument("--spiffe-id", required=True, help="the workload's SPIFFE ID (the subject)")
    target = check.add_mutually_exclusive_group(required=True)
    target.add_argument("--audience", help="catalog id of the target")
    target.add_argument("--resource", help="resource URI of the target")
    check.add_argument("--scope", required=True, help="space-separated scopes")
    check.add_argument(
        "--client-auth",
        default="none",
        choices=sorted(CLIENT_AUTH_METHODS),
        help="how the client authenticated (context.client_auth): spiffe_x509, an X.509-SVID on the TLS "
        "listener; spiffe_jwt, a JWT-SVID client assertion",
    )
    check.add_argument(
        "--binding",
        default="none",
        choices=sorted(BINDINGS),
        help="the token binding to assume (context.binding): mtls, to the client certificate; dpop, "
        "to a DPoP key",
    )
    check.add_argument(
        "--task",
        metavar="ID",
        help="the exchange names this task, found active and assigned to --spiffe-id (context.task)",
    )
    check.add_argument("--task-purpose", metavar="TEXT", default="", help="with --task: the task's purpose")
    check.add_argument(
        "--task-creator",
        metavar="SPIFFE_ID",
        help="with --task: who created the task (default: the --spiffe-id)",
    )
    check.add_argument(
        "--task-deadline",
        metavar="SECONDS",
        type=int,
        default=DEFAULT_TASK_SECONDS,
        help="with --task: seconds from --now until the task's deadline; 0 or less for one already past",
    )
    check.add_argument(
        "--actor",
        metavar="SPIFFE_ID",
        action="append",
        default=None,
        help="delegation: the acting party (context.actor); repeat for a chain, current actor first, "
        "then the earlier ones (all in context.actors)",
    )
    check.add_argument(
        "--break-glass",
        action="store_true",
        help="an active break-glass exception covers this workload, target and scopes "
        "(context.break_glass; never with --actor)",
    )
    check.add_argument(
        "--subject-token-class",
        default="svid",
        choices=sorted(SUBJECT_TOKEN_CLASSES),
        help="the subject token (context.subject_token_class): a JWT-SVID, or a tool or data token this "
        "server issued, re-exchanged by delegation (needs --actor)",
    )
    check.add_argument(
        "--now",
        metavar="EPOCH_SECONDS",
        type=int,
        help="decide as at this time (context.now, hour_utc, weekday_utc; default: the current time)",
    )


def _settings(path: Path) -> Settings:
    settings = load_settings(path)
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _serve(args: argparse.Namespace) -> int:
    """Check everything in this process (keys made, policies validated), then start the workers.

    The workers share one private metrics directory (``PROMETHEUS_MULTIPROC_DIR``), made before
    anything imports prometheus_client and removed when serving ends (``sts.metrics``)."""
    from sts.web.supervisor import multiprocess_dir

    settings = _settings(args.config)
    if not settings.metrics.enabled:
        return _serve_checked(args, settings)
    with multiprocess_dir():
        return _serve_checked(args, settings)


def _serve_checked(args: argparse.Namespace, settings: Settings) -> int:
    from sts.runtime import build_services

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
    """uvicorn's server (uvloop), one event loop per worker, with our connection protocol
    (:mod:`sts.web.plain_server`: the deadlines and limits of ``server:``).

    ``server.max_connections`` bounds the connections a worker holds (slow ones included): past it
    a request is answered 503 at once instead of queueing. HTTP/1.1 only; no websockets. On SIGINT or
    SIGTERM requests in flight get ``server.drain_timeout`` to finish; the supervisor then kills any
    worker still alive (uvicorn's own supervisor would wait for it forever).
    """
    import uvicorn

    from sts.web.plain_server import PlainHttpProtocol

    server = settings.server
    config = uvicorn.Config(
        "sts.web.asgi:create_asgi_app_from_env",
        factory=True,
        host=settings.listen.host,
        port=settings.listen.port,
        workers=server.workers,
        loop="uvloop",
        http=PlainHttpProtocol,
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        # The peer is the connection's address. uvicorn's default trusts X-Forwarded-For from
        # 127.0.0.1, so a local process or a sidecar's caller could choose its own source and pass
        # metrics.allow or spread anonymous refusals over invented addresses.
        proxy_headers=False,
        backlog=min(max(1024, server.max_connections), 65535),
        timeout_graceful_shutdown=server.drain_timeout,
    )
    if server.workers == 1:
        uvicorn.Server(config).run()
        return
    from sts.web.listeners import reserve, spreads_connections
    from sts.web.supervisor import BoundedMultiprocess

    # With server.reuse_port, one socket per worker (SO_REUSEPORT), so the kernel spreads connections
    # over the workers (sts.web.listeners); otherwise one socket shared by all as uvicorn binds it.
    host, port = settings.listen.host, settings.listen.port
    per_worker = spreads_connections(server.reuse_port, server.workers)
    sock = reserve(host, port) if per_worker else config.bind_socket()
    try:
        BoundedMultiprocess(config, sockets=[sock], drain_seconds=server.drain_timeout).run()
    finally:
        sock.close()


def _config_check(args: argparse.Namespace) -> int:
    from sts.config_report import check_config

    report = check_config(args.config)
    print(report.render())
    for problem in report.problems:
        print(f"problem:       {problem}", file=sys.stderr)
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return EXIT_OK if report.ok else EXIT_CONFIG


def _policy_check(args: argparse.Namespace) -> int:
    from sts.policy import CedarPolicy, PolicyRequest, TaskFacts, explain, refused_crossing
    from sts.spiffeid import SpiffeId, SpiffeIdError

    settings = _settings(args.config)
    policy = CedarPolicy.from_directory(settings.policy_dir, settings.catalog)
    problem = _policy_check_usage(args, settings.tokens.max_delegation_depth)
    if problem:
        print(f"sts: policy check: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    flag = "--spiffe-id"
    try:
        principal = SpiffeId.parse(args.spiffe_id)
        flag = "--actor"
        actors = [SpiffeId.parse(actor) for actor in args.actor or ()]
        flag = "--task-creator"
        creator = SpiffeId.parse(args.task_creator) if args.task_creator else principal
    except SpiffeIdError as e:
        print(f"sts: {flag}: not a SPIFFE ID: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        entry = settings.catalog.resolve(
            [args.audience] if args.audience else [], [args.resource] if args.resource else []
        )
        scopes = settings.catalog.check_scopes(entry, frozenset(args.scope.split()))
    except StsError as e:
        print(f"DENY ({e.error}): {e.description}")
        return EXIT_NO
    now = int(time.time()) if args.now is None else args.now
    task = TaskFacts(args.task, args.task_purpose, creator, now + args.task_deadline) if args.task else None
    request = PolicyRequest(
        principal=principal,
        target=entry,
        scopes=scopes,
        now=now,
        client_auth=args.client_auth,
        binding=args.binding,
        task=task,
        actor=actors[0] if actors else None,
        actors=frozenset(str(actor) for actor in actors),
        break_glass=args.break_glass,
        subject_token_class=args.subject_token_class,
    )
    decision = policy.decide(request)
    print(explain(decision, request, policy.origins))
    allowed = decision.allowed and refused_crossing(decision, request) is None
    return EXIT_OK if allowed else EXIT_NO


def _policy_check_usage(args: argparse.Namespace, max_delegation_depth: int) -> str | None:
    """Flags that describe no exchange the server would ever make (its rules, sts.exchange)."""
    if not args.task:
        given = [
            name
            for name, value, default in (
                ("--task-purpose", args.task_purpose, ""),
                ("--task-creator", args.task_creator, None),
                ("--task-deadline", args.task_deadline, DEFAULT_TASK_SECONDS),
            )
            if value != default
        ]
        if given:
            return f"{', '.join(given)}: only with --task ID (they describe the task the exchange names)"
    actors = args.actor or []
    if args.subject_token_class != "svid" and not actors:
        return (
            f"--subject-token-class {args.subject_token_class}: a token issued by this server is a "
            "subject only with an actor token; give --actor"
        )
    if args.break_glass and actors:
        return "--break-glass with --actor: a break-glass exception never applies to a delegated exchange"
    if len(actors) > max_delegation_depth:
        return (
            f"--actor given {len(actors)} times: the delegation chain is longer than "
            f"tokens.max_delegation_depth ({max_delegation_depth}); the exchange refuses it"
        )
    return None


def _keys_create(args: argparse.Namespace) -> int:
    from sts.keys import create_provisioned_keys

    settings = _settings(args.config)
    for kid in create_provisioned_keys(settings.keys):
        print(kid)
    return EXIT_OK


def _dev(args: argparse.Namespace) -> int:
    from sts.dev.environment import run

    configure_logging("INFO")
    return run(args.state_dir, args.port, spire=args.spire)


def _demo(args: argparse.Namespace) -> int:
    """Exit 0 only if every step of the story behaved as it must (``sts.dev.story``)."""
    from sts.dev.story import run

    configure_logging("WARNING")
    return run(args.state_dir)


def _workload_api(args: argparse.Namespace) -> int:
    from spire.registry import RegistryError
    from spire.server import serve

    configure_logging("INFO")
    try:
        serve(args.config, args.state_dir)
    except RegistryError as e:
        raise ConfigError(str(e)) from e
    return EXIT_OK


def _svid(args: argparse.Namespace) -> int:
    """Like ``spire-agent api fetch jwt``: the caller's JWT-SVID for one audience, via py-spiffe."""
    from spiffe import WorkloadApiClient
    from spiffe.errors import PySpiffeError

    socket = args.socket or os.environ.get(SOCKET_ENV) or None
    if socket is None:
        print(
            "sts svid: no Workload API socket: give --socket unix:///path/to/workload.sock "
            f"or set {SOCKET_ENV}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    origin = socket if args.socket else f"{socket} ({SOCKET_ENV})"
    try:
        with WorkloadApiClient(socket_path=socket) as client:
            print(client.fetch_jwt_svid(audience={args.audience}, timeout=10).token)
    except PySpiffeError as e:
        print(f"sts: cannot fetch a JWT-SVID from {origin}: {e}", file=sys.stderr)
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
