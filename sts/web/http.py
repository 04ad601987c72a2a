"""One request model for every front end: the two production listeners and WSGI (tests, embedding).

The plain listener (``sts.web.plain_server`` on uvicorn's server) and the TLS listener (asyncio + h11,
``sts.web.tls_server``) each read a request under their own deadlines and size limit, then hand a
complete :class:`HttpRequest` to :class:`StsHttp`, which answers synchronously. So the application
never blocks on a client: by the time it runs, the body is in memory or the request was refused
(408/413) before it. ``POST /token`` is answered by :class:`~sts.web.token_endpoint.TokenEndpoint`
directly (the hot path); every other route goes to the Flask app through a WSGI environ built here.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from sts.errors import InvalidRequest, RequestTooLarge, StsError
from sts.web.urlencoded import decode_form

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
MAX_HEAD_BYTES = 16 * 1024  # request line + header fields, on both listeners; more is refused
CLIENT_CERTIFICATES_ENVIRON = "sts.client_certificates"  # WSGI environ key: the verified peer chain
SOURCE_ENVIRON = "REMOTE_ADDR"

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

STATUS_TEXT = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    417: "Expectation Failed",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(slots=True)
class HttpRequest:
    """A request whose head and body have been read completely (or refused while reading).

    ``headers`` has lower-case names; repeated fields are joined with ", " (RFC 9110 §5.3), so a
    repeated credential header (``Authorization``, ``DPoP``) can never parse as one credential.
    ``body_error`` is the refusal the front end met while reading the body (408, 413): the endpoint
    reports it in its own protocol form, audited like any other refusal.
    """

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    source: str
    scheme: str = "http"
    server: tuple[str, int] = ("127.0.0.1", 0)
    client_certificates: tuple[x509.Certificate, ...] = ()
    body_error: StsError | None = None


@dataclass(slots=True)
class HttpResponse:
    """An answer; its framing (``Content-Length``, ``Connection``) is the listener's to write."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def closes(self) -> bool:
        """The connection must not carry another request after this answer."""
        return any(name.lower() == "connection" and value.lower() == "close" for name, value in self.headers)


class MalformedHead(InvalidRequest):
    """A request head that cannot be trusted (RFC 9112 §3.2, §6.3): answered 400, connection closed."""

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class HeadTooLarge(MalformedHead):
    """RFC 6585 §5: the request line and header fields are over ``MAX_HEAD_BYTES``."""

    status = 431


SINGLE_FIELDS = frozenset({"host", "content-length"})

# Built once: ``json.dumps`` with options builds an encoder on every call.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def json_response(status: int, body: object, extra: Iterable[tuple[str, str]] = ()) -> HttpResponse:
    """A JSON answer with the headers every answer of ours carries (no caching, no sniffing)."""
    headers = [
        ("Content-Type", "application/json"),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        *extra,
    ]
    return HttpResponse(status, headers, _COMPACT_JSON.encode(body).encode())


def error_answer(error: StsError, extra: Iterable[tuple[str, str]] = ()) -> HttpResponse:
    """An RFC 6749 §5.2 error body with the error's own headers (challenge, Retry-After, close)."""
    return json_response(error.status, error.to_json(), [*extra, *error.headers().items()])


def joined_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header fields by lower-case name, repeated ones joined with ", " (RFC 9110 §5.3).

    Fields that must appear once are refused when repeated: two ``Host`` (RFC 9112 §3.2 requires
    400), two ``Content-Length`` (§6.3: the framing is ambiguous). Two ``Authorization`` or ``DPoP``
    fields join into a value that parses as no credential, so each endpoint refuses them in its own
    protocol's terms (``invalid_token``, ``invalid_dpop_proof``: RFC 9449 §4.3).
    """
    headers: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        if key in headers:
            if key in SINGLE_FIELDS:
                raise MalformedHead(f"the {name} header field must appear only once")
            headers[key] = f"{headers[key]}, {value}"
        else:
            headers[key] = value
    return headers


def declared_length(headers: Mapping[str, str]) -> int | None:
    """``Content-Length`` as a number; None when absent (chunked); InvalidRequest when malformed.

    RFC 9112 §6.3: a Content-Length that is not a single run of digits is an unrecoverable error.
    The digit count is bounded first, so a 400-digit value costs nothing.
    """
    value = headers.get("content-length")
    if value is None:
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise InvalidRequest("Content-Length must be one non-negative number")
    return int(value)


def parse_form(body: bytes, content_type: str, query: str) -> dict[str, list[str]]:
    """The form body of an OAuth endpoint (RFC 6749 §3.2, Appendix B), refusing what it must.

    The media type must be ``application/x-www-form-urlencoded``, parameters must not be in the URL
    (RFC 6749 §3.2 for the token endpoint; the same for introspection and revocation), and the body
    must be UTF-8, before and after percent-decoding (:mod:`sts.web.urlencoded`). Repeated names are
    kept as lists: the endpoints refuse what may appear only once.
    """
    mimetype = content_type.partition(";")[0].strip().lower()
    if mimetype != FORM_CONTENT_TYPE:
        raise InvalidRequest(f"the request must be sent as {FORM_CONTENT_TYPE}")
    if query:
        raise InvalidRequest("parameters must be sent in the request body, not the URL")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest("the request body is not UTF-8") from e
    return decode_form(text)


def read_wsgi_body(environ: Mapping[str, Any], limit: int) -> bytes:
    """The body of a WSGI request, refusing excess (413) instead of truncating it.

    Only the WSGI front end (tests, embedding) reads this way; the production listeners have read
    the body under a deadline before the application runs.
    """
    headers = {"content-length": str(environ["CONTENT_LENGTH"])} if environ.get("CONTENT_LENGTH") else {}
    declared = declared_length(headers)
    if declared is not None and declared > limit:
        raise RequestTooLarge(f"request body is larger than {limit} bytes")
    stream = environ["wsgi.input"]
    body: bytes = stream.read(declared) if declared is not None else stream.read(limit + 1)
    if len(body) > limit:
        raise RequestTooLarge(f"request body is larger than {limit} bytes")
    return body


def wsgi_headers(environ: Mapping[str, Any]) -> dict[str, str]:
    """The header fields of a WSGI environ (PEP 3333 ``HTTP_*``, plus the two CGI ones)."""
    headers = {
        key[5:].replace("_", "-").lower(): str(value)
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    for key, name in (("CONTENT_TYPE", "content-type"), ("CONTENT_LENGTH", "content-length")):
        if environ.get(key):
            headers[name] = str(environ[key])
    return headers


def request_from_environ(environ: Mapping[str, Any], limit: int) -> HttpRequest:
    """An :class:`HttpRequest` from a WSGI environ; a body refusal is kept in ``body_error``."""
    body, error = b"", None
    try:
        body = read_wsgi_body(environ, limit)
    except StsError as e:
        error = e
    return HttpRequest(
        method=str(environ.get("REQUEST_METHOD", "GET")),
        path=str(environ.get("PATH_INFO", "/")),
        query=str(environ.get("QUERY_STRING", "")),
        headers=wsgi_headers(environ),
        body=body,
        source=str(environ.get(SOURCE_ENVIRON, "")),
        scheme=str(environ.get("wsgi.url_scheme", "http")),
        client_certificates=tuple(environ.get(CLIENT_CERTIFICATES_ENVIRON, ())),
        body_error=error,
    )


def environ_for(request: HttpRequest) -> dict[str, Any]:
    """A PEP 3333 environ for ``request``, to hand a complete request to the Flask app."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        # PEP 3333: PATH_INFO is the percent-decoded path as latin-1 text.
        "PATH_INFO": request.path.encode("utf-8", "surrogateescape").decode("latin-1"),
        "QUERY_STRING": request.query,
        "SERVER_NAME": request.server[0],
        "SERVER_PORT": str(request.server[1]),
        "SERVER_PROTOCOL": "HTTP/1.1",
        SOURCE_ENVIRON: request.source,
        "CONTENT_LENGTH": str(len(request.body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": request.scheme,
        "wsgi.input": io.BytesIO(request.body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        CLIENT_CERTIFICATES_ENVIRON: request.client_certificates,
    }
    for name, value in request.headers.items():
        if name == "content-type":
            environ["CONTENT_TYPE"] = value
        elif name != "content-length":
            environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def call_wsgi(app: WsgiApp, environ: dict[str, Any]) -> HttpResponse:
    """Run a WSGI app to completion and collect its answer (our routes answer small JSON bodies)."""
    answer = HttpResponse(500)

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        answer.status = int(status.split(" ", 1)[0])
        answer.headers = [(name, value) for name, value in headers if name.lower() != "content-length"]

    chunks = app(environ, start_response)
    try:
        answer.body = b"".join(chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return answer


def status_line(status: int) -> str:
    return f"{status} {STATUS_TEXT.get(status, 'Error')}"


def client_certificate_chain(environ: Mapping[str, Any]) -> tuple[x509.Certificate, ...]:
    """The client certificate chain the TLS listener verified for this request (empty: none)."""
    return tuple(environ.get(CLIENT_CERTIFICATES_ENVIRON, ()))
