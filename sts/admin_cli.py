"""``sts admin …``: the operators' live view and commands against a running STS (``/admin/…``).

Every command authenticates as the administrator itself, with its own JWT-SVID: from ``--svid-file``,
or fetched from its Workload API socket (``--socket``, default ``$SPIFFE_ENDPOINT_SOCKET``) for the
audience ``--issuer``. The server decides (admins only) and audits each call; this module only asks
and prints: a table for people, ``--json`` for scripts. Exit 0 ok, 1 refused by the server (its error
and description printed), 2 usage, configuration or connection error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sts.logsafe import escape
from sts.memfile import MemoryFile

EXIT_OK, EXIT_NO, EXIT_CONFIG = 0, 1, 2
SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"
ISSUER_ENV = "STS_ISSUER"

_Run = Callable[[argparse.Namespace], int]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's ``(default: …)``, except where there is none to show (as ``sts.cli``'s)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == "" or action.required:
            return action.help
        return super()._get_help_string(action)


class Refused(Exception):
    """The server answered with an error: exit 1."""


class Unusable(Exception):
    """No SVID, no issuer, no connection: exit 2."""


def add_admin_commands(admin: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The live view (``tasks``, ``task``, ``tokens``, ``revocations``, ``exceptions``) and the commands
    (``revoke``, ``withdraw-exception``, ``unrevoke-workload``) under ``sts admin``."""
    tasks = _add(admin, "tasks", "list tasks (newest first)", _tasks)
    tasks.add_argument("--assignee", metavar="SPIFFE_ID", help="only tasks assigned to this workload")
    tasks.add_argument("--active", action="store_true", help="only tasks still active")
    _limit(tasks)
    task = _add(admin, "task", "one task with its tokens", _task)
    task.add_argument("task_id", metavar="ID")
    _limit(task)
    tokens = _add(admin, "tokens", "unexpired tokens of a workload or a task", _tokens)
    which = tokens.add_mutually_exclusive_group(required=True)
    which.add_argument("--spiffe-id", metavar="SPIFFE_ID")
    which.add_argument("--task", metavar="ID")
    _limit(tokens)
    _limit(_add(admin, "revocations", "kill switches still kept", _revocations))
    exceptions = _add(admin, "exceptions", "break-glass exceptions", _exceptions)
    exceptions.add_argument("--spiffe-id", metavar="SPIFFE_ID")
    _limit(exceptions)
    revoke = _add(admin, "revoke", "revoke a token, a task, or every token of a workload", _revoke)
    kind = revoke.add_mutually_exclusive_group(required=True)
    kind.add_argument("--jti")
    kind.add_argument("--task", metavar="ID")
    kind.add_argument("--spiffe-id", metavar="SPIFFE_ID")
    revoke.add_argument("--until", type=int, metavar="EPOCH", help="with --spiffe-id: lift at this time")
    revoke.add_argument("--reason", required=True, help="why (audited)")
    withdraw = _add(admin, "withdraw-exception", "end an exception now, and its tokens", _withdraw)
    withdraw.add_argument("exception_id", metavar="ID")
    withdraw.add_argument("--reason", required=True, help="why (audited)")
    _add_store_loss(admin)
    lift = _add(admin, "unrevoke-workload", "lift a workload's kill switch early", _unrevoke)
    lift.add_argument("spiffe_id", metavar="SPIFFE_ID")
    lift.add_argument("--reason", required=True, help="why (audited)")


def _add_store_loss(admin: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``sts admin store-loss ack``: POST /admin/store-loss/ack (docs/operations.md, store loss)."""
    store_loss = admin.add_parser("store-loss", help="a loss of the shared store")
    commands = store_loss.add_subparsers(title="store-loss commands")
    ack = _add(
        commands,
        "ack",
        "acknowledge a store loss so exchanges resume: the kill switches given with --kill are "
        "re-asserted first; tokens issued before the loss stay inactive",
        _store_loss_ack,
    )
    ack.add_argument("--url", dest="issuer", help=argparse.SUPPRESS)  # its name before --issuer
    ack.add_argument("--reason", required=True, help="why the loss is accepted (audited)")
    ack.add_argument(
        "--kill",
        metavar="SPIFFE_ID",
        action="append",
        default=None,
        help="re-assert this workload's kill switch (for good) before acknowledging; repeatable",
    )


def _add(
    admin: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str, run: _Run
) -> argparse.ArgumentParser:
    description = f"{text}. Exit 0 ok, 1 refused by the server, 2 usage or connection error."
    parser = admin.add_parser(name, help=text, description=description, formatter_class=_HelpFormatter)
    parser.add_argument(
        "--issuer", default=os.environ.get(ISSUER_ENV), help=f"the STS base URL (default: ${ISSUER_ENV})"
    )
    parser.add_argument("--audience", help="the audience of the admin's JWT-SVID (default: --issuer)")
    parser.add_argument("--svid-file", type=Path, metavar="FILE", help="a file holding the admin's JWT-SVID")
    parser.add_argument(
        "--socket", metavar="unix:///PATH", help=f"the Workload API socket (default: ${SOCKET_ENV})"
    )
    parser.add_argument(
        "--mtls",
        action="store_true",
        help="authenticate with the admin's X.509-SVID from the Workload API instead of a JWT-SVID "
        "(--issuer is then the TLS listener, e.g. https://sts:8444; its certificate is verified with "
        "the trust bundle the Workload API gives, unless --ca)",
    )
    parser.add_argument(
        "--cert", type=Path, metavar="FILE", help="the admin's X.509-SVID chain (PEM), with --key"
    )
    parser.add_argument("--key", type=Path, metavar="FILE", help="the private key of --cert (PEM)")
    parser.add_argument("--ca", type=Path, metavar="FILE", help="CA certificates that verify an https issuer")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the STS")
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer")
    parser.set_defaults(run=lambda args: _guarded(run, args))
    return parser


def _limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, help="at most this many rows (the server allows 1-1000)")


def _guarded(run: _Run, args: argparse.Namespace) -> int:
    try:
        return run(args)
    except Refused as e:
        print(f"refused: {escape(str(e))}", file=sys.stderr)
        return EXIT_NO
    except Unusable as e:
        print(f"sts admin: {e}", file=sys.stderr)
        return EXIT_CONFIG


def jwt_svid(args: argparse.Namespace, issuer: str) -> str:
    """The admin's own JWT-SVID: ``--svid-file``, else fetched from the Workload API for the issuer."""
    if args.svid_file is not None:
        try:
            return str(args.svid_file.read_text(encoding="utf-8").strip())
        except OSError as e:
            raise Unusable(f"cannot read {args.svid_file}: {e.strerror}") from e
    from spiffe import WorkloadApiClient
    from spiffe.errors import PySpiffeError

    socket = args.socket or os.environ.get(SOCKET_ENV) or None
    if socket is None:
        raise Unusable(f"no JWT-SVID: give --svid-file, --socket or set {SOCKET_ENV}")
    try:
        with WorkloadApiClient(socket_path=socket) as client:
            return str(client.fetch_jwt_svid(audience={args.audience or issuer}, timeout=10).token)
    except PySpiffeError as e:
        raise Unusable(f"cannot fetch a JWT-SVID from {socket}: {e}") from e


def x509_svid_files(args: argparse.Namespace) -> tuple[MemoryFile, MemoryFile, MemoryFile]:
    """The admin's X.509-SVID (chain, key) and its trust domain's X.509 bundle, from the Workload API,
    in memory files (:mod:`sts.memfile`): the key is never written to disk (RFC 8705 §2.2 client auth)."""
    from cryptography.hazmat.primitives import serialization
    from spiffe import WorkloadApiClient
    from spiffe.errors import PySpiffeError

    socket = args.socket or os.environ.get(SOCKET_ENV) or None
    if socket is None:
        raise Unusable(f"--mtls: no Workload API socket: give --socket or set {SOCKET_ENV}")
    try:
        with WorkloadApiClient(socket_path=socket) as client:
            context = client.fetch_x509_context(timeout=10)
    except PySpiffeError as e:
        raise Unusable(f"cannot fetch an X.509-SVID from {socket}: {e}") from e
    svid = context.default_svid
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    if svid is None or bundle is None:
        raise Unusable(f"{socket} served no X.509-SVID with its trust bundle")
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
    key = svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    authorities = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle.x509_authorities)
    return MemoryFile(chain, "svid.pem"), MemoryFile(key, "svid.key"), MemoryFile(authorities, "bundle.pem")


def _credentials(args: argparse.Namespace, issuer: str, stack: ExitStack) -> dict[str, Any]:
    """How this call authenticates: a client certificate (``--mtls``, ``--cert``/``--key``) or the
    admin's JWT-SVID as a bearer token; and what verifies the server."""
    verify: str | bool = str(args.ca) if args.ca else True
    if args.cert is not None or args.key is not None:
        if args.cert is None or args.key is None or args.mtls:
            raise Unusable("--cert and --key go together, and not with --mtls")
        return {"cert": (str(args.cert), str(args.key)), "verify": verify}
    if args.mtls:
        if args.svid_file is not None:
            raise Unusable("--mtls authenticates with the X.509-SVID: not with --svid-file")
        cert, key, bundle = (stack.enter_context(file) for file in x509_svid_files(args))
        return {"cert": (cert.path, key.path), "verify": verify if args.ca else bundle.path}
    return {"headers": {"Authorization": f"Bearer {jwt_svid(args, issuer)}"}, "verify": verify}


def call(args: argparse.Namespace, method: str, path: str, body: Any = None, **query: Any) -> dict[str, Any]:
    """One authenticated admin call; the JSON object answered, or Refused / Unusable."""
    import requests

    if not args.issuer:
        raise Unusable(f"no issuer: give --issuer or set {ISSUER_ENV}")
    issuer = str(args.issuer).rstrip("/")
    params = {k: v for k, v in query.items() if v is not None and v is not False}
    with ExitStack() as stack:
        credentials = _credentials(args, issuer, stack)
        try:
            response = requests.request(
                method,
                f"{issuer}{path}",
                params={k: "1" if v is True else str(v) for k, v in params.items()},
                json=body,
                timeout=args.timeout,
                **credentials,
            )
        except requests.RequestException as e:
            raise Unusable(f"cannot reach {issuer}: {e}") from e
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code >= 300 or not isinstance(answer, dict):
        error = answer.get("error", "") if isinstance(answer, dict) else ""
        description = answer.get("error_description", "") if isinstance(answer, dict) else response.text[:200]
        raise Refused(f"{response.status_code} {error}: {description}")
    return answer


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _print(
    args: argparse.Namespace, answer: dict[str, Any], rows: list[dict[str, Any]], columns: Sequence[str]
) -> int:
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return EXIT_OK
    table = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in table)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value)
    # Reasons, SPIFFE IDs and errors are other people's text: never a terminal control sequence.
    return escape(str(value))


_TOKEN_COLUMNS = ("jti", "spiffe_id", "task_id", "target", "token_class", "exp", "binding", "revoked")


def _tasks(args: argparse.Namespace) -> int:
    answer = call(args, "GET", "/admin/tasks", assignee=args.assignee, active=args.active, limit=args.limit)
    columns = ("task_id", "status", "assignee", "creator", "deadline", "purpose")
    return _print(args, answer, answer.get("tasks", []), columns)


def _task(args: argparse.Namespace) -> int:
    answer = call(args, "GET", f"/admin/tasks/{_quote(args.task_id)}", limit=args.limit)
    if not args.json:
        for name in ("task_id", "status", "assignee", "creator", "purpose", "deadline", "completed_by"):
            print(f"{name + ':':14} {_cell(answer.get(name))}")
        print()
    return _print(args, answer, answer.get("tokens", []), _TOKEN_COLUMNS)


def _tokens(args: argparse.Namespace) -> int:
    answer = call(args, "GET", "/admin/tokens", spiffe_id=args.spiffe_id, task_id=args.task, limit=args.limit)
    return _print(args, answer, answer.get("tokens", []), _TOKEN_COLUMNS)


def _revocations(args: argparse.Namespace) -> int:
    answer = call(args, "GET", "/admin/revocations", limit=args.limit)
    columns = ("spiffe_id", "in_force", "revoked_at", "until", "by", "reason")
    return _print(args, answer, answer.get("revocations", []), columns)


def _exceptions(args: argparse.Namespace) -> int:
    answer = call(args, "GET", "/admin/exceptions", spiffe_id=args.spiffe_id, limit=args.limit)
    columns = ("exception_id", "status", "spiffe_id", "target", "scopes", "expires_at", "reason")
    return _print(args, answer, answer.get("exceptions", []), columns)


def _revoke(args: argparse.Namespace) -> int:
    if args.until is not None and args.spiffe_id is None:
        raise Unusable("--until applies only with --spiffe-id")
    body: dict[str, Any] = {"reason": args.reason}
    if args.jti is not None:
        body["jti"] = args.jti
    elif args.task is not None:
        body["task_id"] = args.task
    else:
        body["spiffe_id"] = args.spiffe_id
        if args.until is not None:
            body["until"] = args.until
    answer = call(args, "POST", "/admin/revocations", body)
    return _print(args, answer, [answer], ("revoked", "at", "until", "task_status"))


def _withdraw(args: argparse.Namespace) -> int:
    path = f"/admin/exceptions/{_quote(args.exception_id)}/withdraw"
    answer = call(args, "POST", path, {"reason": args.reason})
    return _print(args, answer, [answer], ("exception_id", "status", "withdrawn_at", "tokens_revoked"))


def _unrevoke(args: argparse.Namespace) -> int:
    answer = call(
        args, "POST", "/admin/revocations/lift", {"spiffe_id": args.spiffe_id, "reason": args.reason}
    )
    return _print(args, answer, [answer], ("lifted", "revoked_at", "at"))


def _store_loss_ack(args: argparse.Namespace) -> int:
    """Exit 0 acknowledged, 1 nothing to acknowledge (or refused)."""
    body = {"reason": args.reason, "kill_list": args.kill or []}
    answer = call(args, "POST", "/admin/store-loss/ack", body)
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return EXIT_OK if answer.get("acknowledged") else EXIT_NO
    for spiffe_id in answer.get("kill_list", []):
        print(f"kill switch:   {_cell(spiffe_id)} (re-asserted)")
    if not answer.get("acknowledged"):
        print(f"nothing to acknowledge: {_cell(answer.get('detail', 'no store loss is in force'))}")
        return EXIT_NO
    print(
        f"acknowledged:  store loss ({_cell(answer.get('cause'))}) detected at "
        f"{_cell(answer.get('detected_at'))} by {_cell(answer.get('detected_by'))}, "
        f"epoch {_cell(answer.get('previous_epoch'))} -> {_cell(answer.get('epoch'))}"
    )
    print(f"not before:    {_cell(answer.get('not_before'))} (tokens issued at or before it stay inactive)")
    print(f"resumes after: {_cell(answer.get('resumes_after'))}")
    return EXIT_OK
