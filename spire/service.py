"""The SPIFFE Workload API over gRPC: the five RPCs of one caller, and the security-header check.

Owns :class:`WorkloadApiHandlers` (``FetchX509SVID``, ``FetchX509Bundles``, ``FetchJWTSVID``,
``FetchJWTBundles``, ``ValidateJWTSVID`` for the workload behind one socket), :func:`create_server`
(registers them under the bare service name so the paths are ``/SpiffeWorkloadAPI/<Method>``), and
:class:`SecurityHeaderInterceptor` (SPIFFE_Workload_Endpoint.md §3). This is the one edge where
protobuf messages meet the domain types of :mod:`spire.state`; status codes follow the Workload
Endpoint spec §6 and SPIRE's messages.

Imports ``grpc``, the generated ``spire.workload_pb2``, ``spire.state``, ``sts.errors``,
``sts.spiffeid``, ``sts.svid`` and ``sts.trust``; must not import ``spire.server`` or any web, policy or
config module.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct

from spire import workload_pb2 as pb
from spire.state import IdentityState, UnknownWorkload, WorkloadSnapshot
from sts.errors import InvalidToken
from sts.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from sts.svid import JwtSvidVerifier
from sts.trust import TrustBundle, TrustStore

logger = logging.getLogger(__name__)

SERVICE_NAME = "SpiffeWorkloadAPI"
"""The service name of the standard proto; with no package it gives ``/SpiffeWorkloadAPI/<Method>``."""
SECURITY_HEADER = "workload.spiffe.io"
SECURITY_HEADER_VALUE = "true"
NO_IDENTITY = "no identity issued"
"""SPIRE's PERMISSION_DENIED message when the caller has no registration."""
# Claims a foreign trust domain's token may pass on to the validator (SPIRE's rule; JWT-SVID.md §3).
_FOREIGN_CLAIMS = frozenset({"sub", "aud", "exp"})

M = TypeVar("M", bound=Message)


class WorkloadApiHandlers:
    """The Workload API as seen by the caller behind one socket: workload ``name`` (stand-in attestation).

    Streams send the complete state at once, then again whenever it changes (a message identical to
    the previous one is skipped, as SPIRE does). Each open stream holds one server thread, so at most
    ``max_streams`` may be open at once on this socket; more get RESOURCE_EXHAUSTED (clients retry),
    which keeps threads free for unary calls.
    """

    def __init__(
        self, state: IdentityState, name: str, *, max_streams: int, poll_seconds: float = 1.0
    ) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self._state = state
        self._name = name
        self._max_streams = max_streams
        self._poll_seconds = poll_seconds
        self._streams = 0
        self._streams_lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._name

    # X.509-SVID profile.

    def fetch_x509_svid(
        self, request: pb.X509SVIDRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.X509SVIDResponse]:
        """Stream the workload's X.509-SVID, its own bundle and the federated ones (Workload API §5.2.1)."""
        return self._watch(context, _x509_svid_response)

    def fetch_x509_bundles(
        self, request: pb.X509BundlesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.X509BundlesResponse]:
        """Stream every trust domain's CA certificates, keyed ``spiffe://<td>`` (Workload API §5.2.2)."""
        return self._watch(context, _x509_bundles_response)

    # JWT-SVID profile.

    def fetch_jwt_svid(self, request: pb.JWTSVIDRequest, context: grpc.ServicerContext) -> pb.JWTSVIDResponse:
        """Mint a JWT-SVID for the requested audiences (Workload API §6.2.1).

        An empty audience or a malformed ``spiffe_id`` is INVALID_ARGUMENT (§4.5); a ``spiffe_id`` that is
        not this workload's is PERMISSION_DENIED, as §6.2.1 says for an identity the caller may not have.
        """
        if not request.audience or not all(request.audience):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        requested: SpiffeId | None = None
        if request.spiffe_id:
            try:
                requested = SpiffeId.parse(request.spiffe_id)
            except SpiffeIdError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid requested SPIFFE ID: {e}")
        try:
            workload = self._state.snapshot(self._name).workload
            if requested is not None and requested != workload.spiffe_id:
                # Workload API §6.2.1: not authorized for the requested identity → PermissionDenied.
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{NO_IDENTITY} for {requested}")
            spiffe_id, token = self._state.mint_jwt_svid(self._name, list(request.audience))
        except UnknownWorkload:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
        return pb.JWTSVIDResponse(svids=[pb.JWTSVID(spiffe_id=str(spiffe_id), svid=token)])

    def fetch_jwt_bundles(
        self, request: pb.JWTBundlesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.JWTBundlesResponse]:
        """Stream every trust domain's JWT authorities (JWKS), keyed ``spiffe://<td>`` (§6.2.2)."""
        return self._watch(context, _jwt_bundles_response)

    def validate_jwt_svid(
        self, request: pb.ValidateJWTSVIDRequest, context: grpc.ServicerContext
    ) -> pb.ValidateJWTSVIDResponse:
        """Verify a JWT-SVID with the bundles the caller may see (Workload API §6.2.3, §6.3); give its claims.

        Verification is :class:`sts.svid.JwtSvidVerifier`'s: signature by a key of the bundle of
        ``sub``'s trust domain, audience, expiry (no leeway). Claims of a foreign trust domain's token are
        cut to ``sub, aud, exp``, as SPIRE does; a single-string ``aud`` becomes a list.
        """
        if not request.audience:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        try:
            snapshot = self._state.snapshot(self._name)
        except UnknownWorkload:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
        trust = TrustStore(_FixedBundleSource(bundle) for bundle in snapshot.bundles.trust.values())
        verifier = JwtSvidVerifier(trust, request.audience, leeway_seconds=0)
        try:
            verified = verifier.verify(request.svid, now=self._state.now())
        except InvalidToken as e:
            logger.debug(
                "ValidateJWTSVID for %s refused (%s): %s", self._name, e.rule, e.detail or e.description
            )
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unable to validate JWT-SVID: {e.description}")
        claims = dict(verified.claims)
        if isinstance(claims.get("aud"), str):
            claims["aud"] = [claims["aud"]]
        if not verified.spiffe_id.member_of(snapshot.workload.spiffe_id.trust_domain):
            claims = {name: value for name, value in claims.items() if name in _FOREIGN_CLAIMS}
        struct = Struct()
        struct.update(claims)
        return pb.ValidateJWTSVIDResponse(spiffe_id=str(verified.spiffe_id), claims=struct)

    # Streaming.

    def _watch(self, context: grpc.ServicerContext, render: Callable[[WorkloadSnapshot], M]) -> Iterator[M]:
        """Send ``render(state)`` at once, then after every change, until the client goes away.

        The slot is taken inside the generator, so a stream whose body never runs holds none.
        """
        with self._streams_lock:
            if self._streams >= self._max_streams:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many open Workload API streams on this socket (at most {self._max_streams})",
                )
            self._streams += 1
        try:
            # Wake the wait below when the call ends, so its thread is freed now rather than at the next poll.
            context.add_callback(self._state.wake)
            seen = -1
            last: M | None = None
            while context.is_active():
                if self._state.closed:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "the Workload API server is shutting down")
                try:
                    snapshot = self._state.snapshot(self._name)
                except UnknownWorkload:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
                if snapshot.version != seen:
                    seen = snapshot.version
                    message = render(snapshot)
                    if message != last:
                        last = message
                        yield message
                self._state.wait_for_change(seen, self._poll_seconds)
        finally:
            with self._streams_lock:
                self._streams -= 1


def method_handlers(handlers: WorkloadApiHandlers) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The five RPCs by method name, with our generated messages' (de)serializers."""
    return {
        "FetchX509SVID": grpc.unary_stream_rpc_method_handler(
            handlers.fetch_x509_svid,
            request_deserializer=pb.X509SVIDRequest.FromString,
            response_serializer=pb.X509SVIDResponse.SerializeToString,
        ),
        "FetchX509Bundles": grpc.unary_stream_rpc_method_handler(
            handlers.fetch_x509_bundles,
            request_deserializer=pb.X509BundlesRequest.FromString,
            response_serializer=pb.X509BundlesResponse.SerializeToString,
        ),
        "FetchJWTSVID": grpc.unary_unary_rpc_method_handler(
            handlers.fetch_jwt_svid,
            request_deserializer=pb.JWTSVIDRequest.FromString,
            response_serializer=pb.JWTSVIDResponse.SerializeToString,
        ),
        "FetchJWTBundles": grpc.unary_stream_rpc_method_handler(
            handlers.fetch_jwt_bundles,
            request_deserializer=pb.JWTBundlesRequest.FromString,
            response_serializer=pb.JWTBundlesResponse.SerializeToString,
        ),
        "ValidateJWTSVID": grpc.unary_unary_rpc_method_handler(
            handlers.validate_jwt_svid,
            request_deserializer=pb.ValidateJWTSVIDRequest.FromString,
            response_serializer=pb.ValidateJWTSVIDResponse.SerializeToString,
        ),
    }


def create_server(handlers: WorkloadApiHandlers, thread_pool: futures.ThreadPoolExecutor) -> grpc.Server:
    """A gRPC server (not yet bound or started) answering the Workload API for one caller.

    The handlers are registered by hand under the bare service name, so the paths are exactly
    ``/SpiffeWorkloadAPI/<Method>`` (the generated descriptor would add our proto package); any other
    method, the WIT-SVID ones included, is UNIMPLEMENTED. Every call passes the security-header check.
    """
    return grpc.server(
        thread_pool,
        handlers=[grpc.method_handlers_generic_handler(SERVICE_NAME, method_handlers(handlers))],
        interceptors=[SecurityHeaderInterceptor()],
    )


# grpc-stubs declares ServerInterceptor generic and types-grpcio does not: the ignore keeps this line
# type-checking under either stub package.
class SecurityHeaderInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg, unused-ignore]
    """Refuse every call without metadata ``workload.spiffe.io: true`` with INVALID_ARGUMENT.

    SPIFFE_Workload_Endpoint.md §3 (SSRF hardening): the header must be present with exactly the value
    ``true``. The real handler is swapped for one of the same kind that aborts, so unary and streaming
    calls are both covered and an unknown method (no handler) stays UNIMPLEMENTED.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or has_security_header(handler_call_details.invocation_metadata):
            return handler
        return _refusing(handler)


def has_security_header(metadata: Any) -> bool:
    """Exactly one ``workload.spiffe.io`` entry, with the value ``true`` (case-sensitive)."""
    values = [value for key, value in (metadata or ()) if key == SECURITY_HEADER]
    return values == [SECURITY_HEADER_VALUE]


def _refuse(request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")


def _refusing(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind and message types as ``handler`` that only refuses."""
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        _refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _FixedBundleSource:
    """A :class:`sts.trust.BundleSource` that serves one bundle taken at one version of the state."""

    def __init__(self, bundle: TrustBundle) -> None:
        self._bundle = bundle

    @property
    def trust_domain(self) -> TrustDomain:
        return self._bundle.trust_domain

    def current(self) -> TrustBundle:
        return self._bundle


# Rendering: domain snapshot → protobuf message.


def _x509_svid_response(snapshot: WorkloadSnapshot) -> pb.X509SVIDResponse:
    own = snapshot.workload.spiffe_id.trust_domain
    svid = snapshot.svid
    return pb.X509SVIDResponse(
        svids=[
            pb.X509SVID(
                spiffe_id=str(svid.spiffe_id),
                x509_svid=svid.chain_der,
                x509_svid_key=svid.private_key_der,
                bundle=snapshot.bundles.x509_der[own],
            )
        ],
        federated_bundles={td.id: der for td, der in snapshot.bundles.x509_der.items() if td != own},
    )


def _x509_bundles_response(snapshot: WorkloadSnapshot) -> pb.X509BundlesResponse:
    return pb.X509BundlesResponse(bundles={td.id: der for td, der in snapshot.bundles.x509_der.items()})


def _jwt_bundles_response(snapshot: WorkloadSnapshot) -> pb.JWTBundlesResponse:
    return pb.JWTBundlesResponse(bundles={td.id: jwks for td, jwks in snapshot.bundles.jwt_jwks.items()})
