"""A workload process for the real-SPIRE tests: ``python -m tests.spire_real.workload COMMAND …``.

The harness runs it as uid 0 with the workload's own primary gid and no supplementary groups, so the
SPIRE agent attests it by ``unix:uid:0`` + ``unix:gid:N``. It talks to the agent with py-spiffe or
:class:`sts.client.TokenClient`, exactly as a workload would, and prints one JSON object on stdout;
refusals and Workload API errors are reported as ``{"error": …}`` (exit 0), so that the test can
assert on them.

Commands: ``ids`` (the SPIFFE IDs of the served X.509-SVIDs), ``jwt`` (JWT-SVIDs for an audience set,
``--count`` fetches in this one process), ``x509`` (the X.509-SVID and bundle written as PEM files),
``token`` (one exchange with ``TokenClient``), ``task`` (``POST /tasks`` with ``TokenClient``),
``session`` (a long-lived ``TokenClient`` / ``TokenVerifier`` driven line by line over stdin).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient
from spiffe.errors import PySpiffeError

from sts.binding import DpopKey, certificate_thumbprint
from sts.client import TokenClient
from sts.errors import StsError


def _ids(args: argparse.Namespace) -> dict[str, Any]:
    try:
        with WorkloadApiClient(socket_path=args.socket) as client:
            svids = client.fetch_x509_svids(timeout=10)
    except PySpiffeError as e:
        return {"ids": [], "error": str(e)}
    return {"ids": [str(s.spiffe_id) for s in svids]}


def _jwt(args: argparse.Namespace) -> dict[str, Any]:
    tokens = []
    try:
        with WorkloadApiClient(socket_path=args.socket) as client:
            for _ in range(args.count):
                svid = client.fetch_jwt_svid(audience=set(args.audience), timeout=10)
                tokens.append(str(svid.token))
    except PySpiffeError as e:
        return {"error": str(e), "tokens": tokens}
    return {"tokens": tokens}


def _x509(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    try:
        with WorkloadApiClient(socket_path=args.socket) as client:
            context = client.fetch_x509_context(timeout=10)
    except PySpiffeError as e:
        return {"error": str(e)}
    svid = context.default_svid
    pem = serialization.Encoding.PEM
    (out / "svid.pem").write_bytes(b"".join(c.public_bytes(pem) for c in svid.cert_chain))
    (out / "svid.key").write_bytes(
        svid.private_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    authorities = list(bundle.x509_authorities) if bundle is not None else []
    (out / "bundle.pem").write_bytes(b"".join(c.public_bytes(pem) for c in authorities))
    return {
        "spiffe_id": str(svid.spiffe_id),
        "chain_length": len(svid.cert_chain),
        "x5t": certificate_thumbprint(svid.leaf),
        "issuers": [c.issuer.rfc4514_string() for c in svid.cert_chain],
    }


def _token(args: argparse.Namespace) -> dict[str, Any]:
    server_ca = Path(args.server_ca).read_text() if args.server_ca else None
    dpop = DpopKey.generate() if args.dpop else None
    with TokenClient(
        args.issuer,
        socket=args.socket,
        spiffe_id=args.spiffe_id,
        mtls_token_endpoint=args.mtls_endpoint,
        server_ca=server_ca,
        max_attempts=1,
    ) as client:
        started = time.time()
        try:
            token = client.token(
                audience=args.audience,
                resource=args.resource,
                scope=args.scope,
                task_id=args.task_id,
                dpop=dpop,
                mtls=args.mtls_endpoint is not None,
                client_assertion=args.client_assertion,
            )
        except StsError as e:
            return _refused(e)
        answer: dict[str, Any] = {
            "access_token": token.value,
            "token_type": token.token_type,
            "expires_in": token.expires_at - started,
        }
        if args.mtls_endpoint is not None:
            cert_file, _ = client.client_certificate_files()
            answer["client_certificate"] = Path(cert_file).read_text()
        if dpop is not None:
            answer["jkt"] = dpop.jkt
        return answer


def _task(args: argparse.Namespace) -> dict[str, Any]:
    targets: dict[str, list[str]] = {}
    for item in args.target:
        target, _, scopes = item.partition("=")
        targets[target] = scopes.split(",")
    with TokenClient(args.issuer, socket=args.socket, max_attempts=1) as client:
        try:
            return client.create_task(args.assignee, targets, purpose=args.purpose, ttl_seconds=args.ttl)
        except StsError as e:
            return _refused(e)


def _refused(e: StsError) -> dict[str, Any]:
    """A refusal as the test sees it, with the underlying cause (``detail``: e.g. py-spiffe's message)."""
    return {"error": e.error, "description": e.description, "class": type(e).__name__, "detail": e.detail}


def _session(args: argparse.Namespace) -> dict[str, Any]:
    """A long-lived workload: one ``TokenClient`` (and, with ``--verify-audience``, one
    ``TokenVerifier``) for the whole process; one JSON request per stdin line, one answer per line.

    ``{"op": "token", "audience": …, "scope": …, "mtls": bool}`` exchanges anew (the token cache is
    cleared first; the client's X.509-SVID and CA file are kept, as in a long-running workload);
    ``{"op": "verify", "token": …}`` verifies an access token as this resource server.
    """
    from sts.verify import TokenVerifier

    verifier = (
        TokenVerifier(
            issuer=args.issuer,
            audience=args.verify_audience,
            token_class=args.token_class,
            socket=args.socket,
            introspection_cache_seconds=0.0,
        )
        if args.verify_audience
        else None
    )
    with TokenClient(
        args.issuer, socket=args.socket, mtls_token_endpoint=args.mtls_endpoint, max_attempts=1
    ) as client:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            answer: dict[str, Any]
            try:
                if request["op"] == "token":
                    client.clear()
                    token = client.token(
                        audience=request["audience"], scope=request["scope"], mtls=request.get("mtls", False)
                    )
                    answer = {"access_token": token.value}
                    if request.get("mtls"):
                        cert_file, _ = client.client_certificate_files()
                        answer["client_certificate"] = Path(cert_file).read_text()
                elif request["op"] == "verify" and verifier is not None:
                    verified = verifier.verify(request["token"])
                    answer = {"sub": verified.claims["sub"]}
                else:
                    answer = {"error": "unknown op"}
            except StsError as e:
                answer = _refused(e)
            print(json.dumps(answer), flush=True)
    return {"done": True}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.spire_real.workload")
    commands = parser.add_subparsers(dest="command", required=True)
    ids = commands.add_parser("ids")
    jwt = commands.add_parser("jwt")
    jwt.add_argument("--audience", action="append", required=True)
    jwt.add_argument("--count", type=int, default=1)
    x509 = commands.add_parser("x509")
    x509.add_argument("--out", required=True)
    token = commands.add_parser("token")
    token.add_argument("--issuer", required=True)
    token.add_argument("--audience")
    token.add_argument("--resource")
    token.add_argument("--scope", required=True)
    token.add_argument("--task-id")
    token.add_argument("--spiffe-id")
    token.add_argument("--client-assertion", action="store_true")
    token.add_argument("--dpop", action="store_true")
    token.add_argument("--mtls-endpoint")
    token.add_argument("--server-ca")
    task = commands.add_parser("task")
    task.add_argument("--issuer", required=True)
    task.add_argument("--assignee", required=True)
    task.add_argument("--target", action="append", required=True, help="TARGET=scope,scope")
    task.add_argument("--purpose", default="real SPIRE test")
    task.add_argument("--ttl", type=int, default=300)
    session = commands.add_parser("session")
    session.add_argument("--issuer", required=True)
    session.add_argument("--mtls-endpoint")
    session.add_argument("--verify-audience")
    session.add_argument("--token-class", default="tool")
    for command in (ids, jwt, x509, token, task, session):
        command.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    handlers = {"ids": _ids, "jwt": _jwt, "x509": _x509, "token": _token, "task": _task, "session": _session}
    print(json.dumps(handlers[args.command](args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
