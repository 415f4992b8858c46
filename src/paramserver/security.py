"""Who is calling and how much they may hold: the transport's authentication,
the binding of a request's client name to the caller's credential, per-caller
limits, and the watchdog that drops idle streams.

Three ways to know the caller (`Authenticator`):
- `Open`: nobody is authenticated; a request's client name is taken on trust
  (loopback and tests, or `serve --insecure`).
- `Certificates` (mTLS, `serve --client-ca`): the TLS handshake already refused
  any client without a valid certificate from the CA; the caller's name is
  the subject Common Name of its certificate, read from the call's auth
  context, never from the request.
- `Tokens`: the caller's name is the one its bearer token was issued to
  (`authorization: Bearer NAME:SECRET` metadata; tokens.py).

With either of the last two, a request that names another client is refused
with PermissionDeniedError before anything changes, and a call without a valid
credential with UnauthenticatedError, whatever name it carries, so an
unauthenticated caller learns nothing about which names exist.

Owns no status codes (server.py maps the errors) and no round logic.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from paramserver import wire
from paramserver.clock import Clock, SystemClock
from paramserver.config import Limits
from paramserver.errors import (
    CredentialsUnavailableError,
    LimitExceededError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from paramserver.tokens import TokenFileError, TokenStore
from paramserver.v1 import parameter_server_pb2 as pb

log = logging.getLogger("paramserver.security")

AUTH_METADATA = "authorization"
BEARER = "Bearer "
COMMON_NAME = "x509_common_name"

Metadata = Sequence[tuple[str, str | bytes]] | None
# gRPC's auth context: property name -> its values (a list of bytes at run
# time, whatever the type stubs say).
AuthContext = Mapping[str, Any]


class Authenticator(Protocol):
    name: str  # for the log: "none", "mtls", "tokens"

    def principal(self, metadata: Metadata, auth_context: AuthContext,
                  ) -> str | None:
        """The caller's client name, or None when calls are not authenticated.
        Raises UnauthenticatedError for a caller without a valid credential."""


class Open:
    name = "none"

    def principal(self, metadata: Metadata, auth_context: AuthContext,
                  ) -> str | None:
        return None


class Certificates:
    name = "mtls"

    def principal(self, metadata: Metadata, auth_context: AuthContext,
                  ) -> str | None:
        names = list(auth_context.get(COMMON_NAME) or [])
        if len(names) != 1 or not isinstance(names[0], bytes):
            raise UnauthenticatedError("the client certificate names no client (no subject CN)")
        try:
            return names[0].decode()
        except UnicodeDecodeError:
            raise UnauthenticatedError("the client certificate's CN is not text") from None


class Tokens:
    name = "tokens"

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    def principal(self, metadata: Metadata, auth_context: AuthContext,
                  ) -> str | None:
        token = _bearer(metadata)
        if token is None:
            raise UnauthenticatedError(f"no '{AUTH_METADATA}: {BEARER}NAME:SECRET' metadata "
                                       "(paramserver client --token-file)")
        try:
            name = self.store.verify(token)
        except TokenFileError as error:
            # The details (the path) go to the operator, not to the caller.
            log.error("%s; every call is refused until it is repaired", error)
            raise CredentialsUnavailableError(
                "the server cannot check credentials now; retry later") from None
        if name is None:
            raise UnauthenticatedError("the token is not valid")
        return name


def _bearer(metadata: Metadata) -> str | None:
    for key, value in metadata or ():
        if key == AUTH_METADATA:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            return text[len(BEARER):] if text.startswith(BEARER) else ""
    return None


def authenticator_for(client_ca: bool, state_dir: Path | None) -> Authenticator:
    """mTLS when the server checks client certificates; else tokens when any
    were ever enrolled in the state dir (tokens.json exists: an emptied file
    still locks everyone out rather than opening the server); else open."""
    if client_ca:
        return Certificates()
    store = TokenStore(state_dir) if state_dir is not None else None
    if store is not None and store.path.exists():
        return Tokens(store)
    return Open()


def check_identity(principal: str | None, claimed: str | None) -> None:
    """A request acts for `claimed`; an authenticated caller may act only for
    itself. Raises PermissionDeniedError."""
    if principal is not None and claimed is not None and claimed != principal:
        raise PermissionDeniedError(principal)


def claimed_name(request: object) -> str | None:
    """The client a decoded request acts for: its client_id, or client_name
    (registration), or its UpdateHeader's client_id (payload messages)."""
    if isinstance(request, wire.Parts):
        return None if request.header is None else str(request.header.client_id)
    if isinstance(request, pb.SecAggClientMessage):  # a secure round's first message
        return request.advertise.client_id if request.HasField("advertise") else None
    for attribute in ("client_id", "client_name"):
        value = getattr(request, attribute, None)
        if isinstance(value, str):
            return value
    return None


class CallCounter:
    """Open calls per caller and open uploads overall, refused past `Limits`."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._per_client: Counter[str] = Counter()
        self._uploads = 0

    def enter(self, principal: str | None, rpc: str, upload: bool) -> None:
        """Raises LimitExceededError (and counts nothing) past a limit."""
        with self._lock:
            if principal is not None and self._per_client[principal] >= self.limits.per_client:
                raise LimitExceededError(
                    f"client {principal!r} already has {self.limits.per_client} calls open, the "
                    f"limit per client ({rpc} refused); let one finish")
            if upload and self._uploads >= self.limits.uploads:
                raise LimitExceededError(
                    f"{self.limits.uploads} uploads are open, the server's limit ({rpc} "
                    "refused); retry later")
            if principal is not None:
                self._per_client[principal] += 1
            self._uploads += upload

    def exit(self, principal: str | None, upload: bool) -> None:
        with self._lock:
            if principal is not None:
                self._per_client[principal] -= 1
                if not self._per_client[principal]:
                    del self._per_client[principal]
            self._uploads -= upload


class Watch:
    """One watched stream: `touch()` on each message, `close()` at its end."""

    def __init__(self, watchdog: StreamWatchdog, key: int, cancel: Callable[[], object]) -> None:
        self._watchdog = watchdog
        self.key = key
        self.cancel = cancel

    def touch(self) -> None:
        self._watchdog._touch(self)

    def close(self) -> None:
        self._watchdog._close(self)


class StreamWatchdog:
    """Cancels a client stream that sends no message for `timeout` seconds,
    so an idle stream cannot hold a server thread for longer than that. One
    thread for all streams; time from the injected clock."""

    def __init__(self, timeout: float, clock: Clock | None = None) -> None:
        self.timeout = timeout
        self._clock = clock or SystemClock()
        self._cond = threading.Condition()
        self._deadlines: dict[int, tuple[float, Watch]] = {}
        self._heap: list[tuple[float, int]] = []
        self._keys = itertools.count()
        self._stopped = False
        self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name="stream-watchdog", daemon=True)
        self._thread.start()

    def watch(self, cancel: Callable[[], object]) -> Watch:
        watch = Watch(self, next(self._keys), cancel)
        with self._cond:
            deadline = self._clock.now() + self.timeout
            self._deadlines[watch.key] = (deadline, watch)
            heapq.heappush(self._heap, (deadline, watch.key))
            self._cond.notify_all()
        return watch

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

    def _touch(self, watch: Watch) -> None:
        # Only moves the deadline: the heap keeps the older one, and the
        # watchdog pushes the stream back when that comes due (one heap
        # entry per stream, not one per message).
        with self._cond:
            if watch.key in self._deadlines:
                self._deadlines[watch.key] = (self._clock.now() + self.timeout, watch)

    def _close(self, watch: Watch) -> None:
        with self._cond:
            self._deadlines.pop(watch.key, None)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                due = self._expired(self._clock.now())
                if due:
                    self._cond.release()  # cancelling wakes the handler thread
                    try:
                        for watch in due:
                            log.info("a client stream sent nothing for %.0f s: cancelled",
                                     self.timeout)
                            watch.cancel()
                    finally:
                        self._cond.acquire()
                    continue
                wake = self._heap[0][0] if self._heap else None
                self._clock.wait(self._cond, None if wake is None else
                                 wake - self._clock.now())

    def _expired(self, now: float) -> list[Watch]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            _, key = heapq.heappop(self._heap)
            entry = self._deadlines.get(key)
            if entry is None:  # closed
                continue
            if entry[0] > now:  # touched since: watch until its new deadline
                heapq.heappush(self._heap, (entry[0], key))
                continue
            del self._deadlines[key]
            due.append(entry[1])
            self.cancelled += 1
        return due


def server_credentials(cert: bytes, key: bytes, client_ca: bytes | None,
                       ) -> grpc.ServerCredentials:
    """TLS with the server's certificate; with `client_ca`, mTLS: a client
    without a certificate from that CA (or with an expired one) fails the
    handshake, before any handler runs."""
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


@dataclass(frozen=True)
class ClientCredentials:
    """What a client proves itself with. `ca` (PEM): talk TLS and trust
    servers certified by it; `cert` and `key` (PEM): present this client
    certificate (mTLS); `token`: send it as a bearer token on every call."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)


def open_channel(address: str, credentials: ClientCredentials | None,
                 options: Sequence[tuple[str, Any]]) -> grpc.Channel:
    """A channel to `address`: TLS when `credentials.ca` is set, with the
    token (if any) added to every call's metadata."""
    creds = credentials or ClientCredentials()
    if creds.ca is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        tls = grpc.ssl_channel_credentials(root_certificates=creds.ca, private_key=creds.key,
                                           certificate_chain=creds.cert)
        channel = grpc.secure_channel(address, tls, options=options)
    if creds.token is None:
        return channel
    return grpc.intercept_channel(channel, _BearerToken(creds.token))


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails,
                 metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer TOKEN` to every call. (gRPC's own call
    credentials need a secure channel; this also works on loopback.)"""

    def __init__(self, token: str) -> None:
        self._entry = (AUTH_METADATA, BEARER + token)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details, (*(details.metadata or ()), self._entry))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)
