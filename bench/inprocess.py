"""In-process measurements: the crypto ceiling, the cost of each exchange stage, the verifier slot, a profile.

Every stage calls the very objects one exchange uses, built by ``sts.runtime.build_services`` from the
bench's own config, so a stage here is the same code as in the server minus HTTP and contention.
Timings are wall-clock medians of several timed batches on one thread (one core).
"""

from __future__ import annotations

import base64
import cProfile
import importlib.util
import io
import pstats
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from sts.catalog import TokenClass
from sts.config import load_settings
from sts.exchange import ExchangeRequest
from sts.policy import PolicyRequest
from sts.runtime import Services, build_services
from sts.web.urlencoded import decode_form


def time_us(fn: Callable[[], object], *, batch_s: float = 0.2, repeats: int = 5) -> float:
    """Median µs per call over ``repeats`` batches of about ``batch_s`` seconds each."""
    fn()  # warm: first-call imports and caches do not count
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < batch_s / 4:
        fn()
        calls += 1
    per_batch = max(1, int(calls * 4 * batch_s / (time.perf_counter() - started) / 4))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            fn()
        samples.append((time.perf_counter() - t0) / per_batch * 1e6)
    return float(statistics.median(samples))


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@dataclass(frozen=True, slots=True)
class Ceiling:
    """The crypto one exchange needs: one ES256 verify (of a JWT-SVID) and one ES256 sign."""

    verify_us: float
    sign_us: float

    @property
    def per_s_per_core(self) -> float:
        return 1e6 / (self.verify_us + self.sign_us)


def crypto_ceiling(
    svid: str, public_key: ec.EllipticCurvePublicKey, *, batch_s: float = 0.2, repeats: int = 5
) -> Ceiling:
    """``cryptography`` directly, with the JWS r||s ↔ DER conversions a JOSE library must also do."""
    signing_input, _, signature = svid.rpartition(".")
    message = signing_input.encode()
    raw = _b64url_decode(signature)
    algorithm = ec.ECDSA(hashes.SHA256())
    private_key = ec.generate_private_key(ec.SECP256R1())
    token_input = message  # same size class as an issued at+jwt's header.payload

    def verify() -> None:
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        public_key.verify(der, message, algorithm)

    def sign() -> bytes:
        r, s = decode_dss_signature(private_key.sign(token_input, algorithm))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return Ceiling(
        verify_us=time_us(verify, batch_s=batch_s, repeats=repeats),
        sign_us=time_us(sign, batch_s=batch_s, repeats=repeats),
    )


@dataclass(frozen=True, slots=True)
class VerifierContext:
    """What a resource-server verifier needs: a token the running server issued, and where it runs."""

    access_token: str
    issuer: str  # also the base URL its metadata and key sets are served from
    audience: str  # the catalog id the token is for
    token_class: str


def verifier_us(context: VerifierContext) -> tuple[float | None, str]:
    """µs per ``TokenVerifier.verify`` on a warm cache (issue 7 §3): THE ONE FUNCTION FOR THE VERIFIER.

    ``sts/verify.py`` (the resource-server library) comes from another issue and may be absent or
    still changing: any failure leaves the slot empty (None) with the reason, and the bench goes on.
    The verifier discovers its keys from the running server (RFC 8414 metadata, then the class's
    JWKS) on the first call; the timed calls are the warm path. Revocation is not checked
    (``without_revocation_check``): with introspection on, a warm call is the same path plus one
    cache lookup, and a cold one is an HTTP round trip to the STS, which is not the library's cost.
    """
    if importlib.util.find_spec("sts.verify") is None:
        return None, "sts/verify.py does not exist yet (another issue); slot left empty"
    try:
        from sts.verify import TokenVerifier

        verifier = TokenVerifier.without_revocation_check(
            issuer=context.issuer, audience=context.audience, token_class=context.token_class
        )
        verifier.verify(context.access_token)  # cold: fetches metadata and keys once
        return (
            time_us(lambda: verifier.verify(context.access_token)),
            "TokenVerifier.without_revocation_check(...).verify(token), keys cached (warm)",
        )
    except Exception as e:  # another issue's library, still changing, must not stop the bench
        return None, f"sts.verify could not be measured: {type(e).__name__}: {e}"


def _scopes(scope: str) -> frozenset[str]:
    """RFC 6749 §3.3 scope tokens, as the exchange splits them."""
    return frozenset(scope.split(" ")) - {""}


def _form(body: str) -> dict[str, list[str]]:
    """What the token endpoint does with the body it read: the shipped decoder, no HTTP around it."""
    return decode_form(body)


def _wsgi_call(services: Services, body: str) -> Callable[[], object]:
    """One whole ``POST /token`` through Flask's WSGI app, in-process (no server, no socket)."""
    from werkzeug.test import EnvironBuilder

    from sts.web.app import create_app

    app = create_app(services)
    environ = EnvironBuilder(
        path="/token", method="POST", data=body.encode(), content_type="application/x-www-form-urlencoded"
    ).get_environ()
    payload = body.encode()
    statuses: list[str] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        statuses.append(status)
        return lambda data: None

    def call() -> object:
        env = dict(environ)
        env["wsgi.input"] = io.BytesIO(payload)
        result = app(env, start_response)
        try:
            chunks = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if not statuses[-1].startswith("200"):
            raise RuntimeError(f"in-process POST /token answered {statuses[-1]}: {chunks[:200]!r}")
        return chunks

    return call


def stages(
    config: Path, body: str, *, batch_s: float = 0.2, calls: int = 3000
) -> tuple[dict[str, float], dict[str, float]]:
    """µs per stage of one valid exchange (no task): (in context, isolated).

    In context: the whole ``POST /token`` runs through Flask's WSGI app in a loop while each stage
    method of the very objects the exchange holds is timed where it is called (caches as cold or warm
    as they really are). Isolated: each stage alone in a tight loop (a lower bound: hot caches).
    """
    services = build_services(load_settings(config))
    try:
        isolated = _isolated_stages(services, body, batch_s)
        in_context = _stages_in_context(services, body, calls)
    finally:
        services.close()
    in_context["parse_form"] = isolated["parse_form"]
    return in_context, isolated


# Stage name → (which object of the exchange, which of its methods). The objects are the exchange's own.
_STAGE_METHODS: tuple[tuple[str, str, str], ...] = (
    ("svid_verify", "verifier", "verify"),
    ("store", "rate", "admit"),  # the rate limit's local units, and a store lease when they run out
    ("store", "store", "issuance_checks"),  # the kill switch and the exceptions, one read
    ("store", "store", "subject_revocation"),  # an actor's kill switch (and older builds' subject's)
    ("store", "store", "exceptions"),  # older builds: read on its own
    ("store", "store", "count_in_window"),  # older builds: the rate counter write
    ("store", "store", "record_token"),  # task and exception tokens (with their budget)
    ("store", "index", "add"),  # any other token's index entry: queued, written in batches
    ("policy", "policy", "decide"),
    ("sign", "keys", "sign"),
    ("audit", "audit", "record"),
)


def _stages_in_context(services: Services, body: str, calls: int = 3000) -> dict[str, float]:
    exchange = services.exchange
    spent: dict[str, float] = {}
    patched: list[tuple[object, str]] = []

    inside: set[str] = set()  # a timed method called by another of its stage counts once

    def timed(stage: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if stage in inside:
                return method(*args, **kwargs)
            inside.add(stage)
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - t0
                inside.discard(stage)

        return wrapper

    # A stage the exchange of this build does not have is skipped (the bench can measure older builds).
    targets = [
        (stage, getattr(exchange, owner), name)
        for stage, owner, name in _STAGE_METHODS
        if hasattr(getattr(exchange, owner, None), name)
    ]
    targets.append(("exchange_total", exchange, "exchange"))
    call = _wsgi_call(services, body)
    for _ in range(300):
        call()
    try:
        for stage, owner, name in targets:
            setattr(
                owner, name, timed(stage, getattr(owner, name))
            )  # an instance attribute shadows the method
            patched.append((owner, name))
        samples: list[tuple[float, dict[str, float]]] = []
        for _ in range(5):
            spent.clear()
            t0 = time.perf_counter()
            for _ in range(calls // 5):
                call()
            samples.append((time.perf_counter() - t0, dict(spent)))
    finally:
        for owner, name in patched:
            delattr(owner, name)
    per_call = calls // 5
    # The batch whose total is the median, so the stages add up to the totals printed with them.
    wall, split = sorted(samples, key=lambda sample: sample[0])[len(samples) // 2]
    result = {stage: seconds / per_call * 1e6 for stage, seconds in split.items()}
    result["wsgi_total"] = wall / per_call * 1e6
    staged = ("svid_verify", "store", "policy", "sign", "audit")
    result["exchange_other"] = result["exchange_total"] - sum(result.get(k, 0.0) for k in staged)
    result["flask_wsgi_and_form"] = result["wsgi_total"] - result["exchange_total"]
    return {k: round(v, 1) for k, v in result.items()}


def _isolated_stages(services: Services, body: str, batch_s: float) -> dict[str, float]:
    exchange = services.exchange
    store = services.store
    request = ExchangeRequest.from_form(_form(body))
    assert request.subject_token is not None
    token = request.subject_token
    subject = exchange.verifier.verify(token)
    spiffe_id = str(subject.spiffe_id)
    entry = exchange.catalog.resolve(request.audiences, request.resources)
    scopes = exchange.catalog.check_scopes(entry, _scopes(request.scope))
    now = int(time.time())
    policy_request = PolicyRequest(principal=subject.spiffe_id, target=entry, scopes=scopes, now=now)
    decision = services.policy.decide(policy_request)
    assert decision.allowed, decision.reason
    claims = {
        "iss": exchange.issuer,
        "sub": spiffe_id,
        "aud": entry.id,
        "client_id": spiffe_id,
        "iat": now,
        "nbf": now,
        "exp": now + 200,
        "jti": secrets.token_urlsafe(16),
        "scope": " ".join(sorted(scopes)),
        "token_class": entry.token_class.value,
    }
    event = {
        "event": "token_exchange",
        "decision": "allow",
        "request_id": "0123456789abcdef",
        "spiffe_id": spiffe_id,
        "target": entry.id,
        "token_class": entry.token_class.value,
        "scopes": sorted(scopes),
        "policy_ids": list(decision.policy_ids),
        "jti": claims["jti"],
        "exp": claims["exp"],
        "kid": services.keys.active(TokenClass(entry.token_class)).kid,
    }

    def measure(fn: Callable[[], object]) -> float:
        return time_us(fn, batch_s=batch_s)

    result = {
        "parse_form": measure(lambda: ExchangeRequest.from_form(_form(body))),
        "svid_verify": measure(lambda: exchange.verifier.verify(token)),
        # The builds before rate leases and Store.issuance_checks are measured by their old calls.
        "store_rate_counter": measure(
            (
                lambda: exchange.rate.admit(
                    f"rate:{spiffe_id}", limit=exchange.limits.per_workload_per_second, now=time.time()
                )
            )
            if hasattr(exchange, "rate")
            else lambda: store.count_in_window(f"rate:{spiffe_id}", window=1, now=time.time())
        ),
        "store_issuance_checks_read": measure(
            (lambda: store.issuance_checks(spiffe_id))
            if hasattr(store, "issuance_checks")
            else lambda: (store.subject_revocation(spiffe_id), store.exceptions(spiffe_id))
        ),
        "catalog_and_scopes": measure(
            lambda: exchange.catalog.check_scopes(
                exchange.catalog.resolve(request.audiences, request.resources), _scopes(request.scope)
            )
        ),
        "policy": measure(lambda: services.policy.decide(policy_request)),
        "sign": measure(lambda: services.keys.sign(entry.token_class, claims)),
        "audit": measure(lambda: services.audit.record(event)),
        "exchange_total": measure(lambda: exchange.exchange(request, request_id="0123456789abcdef")),
    }
    result["store"] = sum(result[k] for k in ("store_rate_counter", "store_issuance_checks_read"))
    return {k: round(v, 1) for k, v in result.items()}


# Profile: where the CPU goes inside one process, grouped by the library that spends it.

_PACKAGES = (
    ("cryptography", "cryptography (OpenSSL)"),
    ("/jwt/", "PyJWT"),
    ("cedarpy", "Cedar (cedarpy)"),
    ("sqlite3", "SQLite"),
    ("/flask/", "Flask"),
    ("/werkzeug/", "Werkzeug"),
    ("/sts/", "sts (our code)"),
    ("json", "json"),
    ("spiffe", "py-spiffe"),
)


def _package(filename: str, name: str) -> str:
    where = f"{filename} {name}"
    for needle, label in _PACKAGES:
        if needle in where:
            return label
    return "stdlib/other"


def profile(config: Path, body: str, *, calls: int = 3000, wsgi: bool = True) -> dict[str, Any]:
    """cProfile over ``calls`` whole requests; self time grouped by package, and the top functions."""
    services = build_services(load_settings(config))
    try:
        if wsgi:
            call = _wsgi_call(services, body)
        else:
            request = ExchangeRequest.from_form(_form(body))

            def call() -> object:
                return services.exchange.exchange(request, request_id="0123456789abcdef")

        for _ in range(200):
            call()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            call()
        profiler.disable()
    finally:
        services.close()
    stats = pstats.Stats(profiler)
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    by_package: dict[str, float] = {}
    total = 0.0
    functions: list[tuple[float, float, str]] = []
    for (filename, line, name), (_cc, _nc, tottime, cumtime, _callers) in raw.items():
        label = _package(filename, name)
        by_package[label] = by_package.get(label, 0.0) + tottime
        total += tottime
        short = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        functions.append((tottime, cumtime, f"{short}:{line}({name})"))
    functions.sort(reverse=True)
    return {
        "what": "WSGI app call (Flask + exchange)" if wsgi else "TokenExchange.exchange",
        "calls": calls,
        "us_per_call_profiled": round(total / calls * 1e6, 1),
        "self_us_per_call_by_package": {
            k: round(v / calls * 1e6, 1) for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])
        },
        "top_self": [
            {
                "us_per_call": round(t / calls * 1e6, 2),
                "cum_us_per_call": round(c / calls * 1e6, 2),
                "function": f,
            }
            for t, c, f in functions[:25]
        ],
    }
