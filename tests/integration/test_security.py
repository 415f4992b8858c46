"""Who gets in, against real server processes: mTLS (refused in the handshake
without a certificate from the CA, with an expired one, with one from another
CA; identity from the certificate, not the request), bearer tokens (missing,
wrong, another client's), and the attacks of an outside check: impersonation,
the 2**40 poisoning, name probing, capacity squatting and 300 idle upload
streams. Each is refused with a clear status while the server goes on
serving everyone else, and changes nothing: the real clients' run completes
with exactly their updates.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paramserver import certs, errors, processes, training
from paramserver.client import ParameterServerClient, RemoteError, RetryPolicy
from paramserver.security import ClientCredentials, open_channel
from paramserver.v1 import parameter_server_pb2 as pb

from .harness import ClientFactory, ServerFactory, ServerProcess, read_log, wait_for

EXIT_TIMEOUT = 120.0
CALL_TIMEOUT = 20.0
ONCE = RetryPolicy(attempts=1)


def run_cli(*args: str) -> str:
    result = subprocess.run(processes.paramserver_command(*args), capture_output=True,
                            text=True, timeout=EXIT_TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def client(server: ServerProcess, credentials: ClientCredentials | None,
           ) -> ParameterServerClient:
    return ParameterServerClient(server.address, timeout=CALL_TIMEOUT, retry=ONCE,
                                 credentials=credentials)


def model() -> dict[str, torch.Tensor]:
    return dict(training.build_model("mlp", 0).state_dict())


def health_status(server: ServerProcess, credentials: ClientCredentials | None,
                  timeout: float) -> int:
    with contextlib.closing(open_channel(server.address, credentials, [])) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)  # type: ignore[attr-defined]
        return int(reply.status)


def handler_lines(server: ServerProcess) -> list[str]:
    """Log lines only a handler writes (a refusal, a registration)."""
    return [line for line in server.log().splitlines()
            if " refused: " in line or " registered" in line]


# -- mTLS --------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """`paramserver certs` for c1 and c2, plus an expired certificate for c3
    and a CA the server does not trust, with a certificate of its own for c1."""
    directory = tmp_path / "pki"
    listing = run_cli("certs", str(directory), "--clients", "c1", "c2")
    assert str(directory / "c1.pem") in listing
    ca = certs.load_ca(directory)
    certs.write_pair(certs.issue(ca, "c3", ["c3"], server=False, expired=True), directory,
                     "c3.pem", "c3-key.pem")
    other = certs.make_ca("another CA")
    certs.write_pair(certs.issue(other, "c1", ["c1"], server=False), directory,
                     "c1-other.pem", "c1-other-key.pem")
    return directory


def mtls(pki: Path, cert: str | None) -> ClientCredentials:
    ca = (pki / certs.CA_CERT).read_bytes()
    if cert is None:
        return ClientCredentials(ca=ca)
    return ClientCredentials(ca=ca, cert=(pki / f"{cert}.pem").read_bytes(),
                             key=(pki / f"{cert}-key.pem").read_bytes())


def mtls_server_args(pki: Path) -> tuple[str, ...]:
    return ("--tls-cert", str(pki / certs.SERVER_CERT), "--tls-key",
            str(pki / certs.SERVER_KEY), "--client-ca", str(pki / certs.CA_CERT))


@pytest.mark.timeout(300)
def test_mtls_refuses_in_the_handshake_and_binds_names_to_certificates(
        server_factory: ServerFactory, client_factory: ClientFactory, pki: Path) -> None:
    server = server_factory(*mtls_server_args(pki), clients=2, rounds=1)
    for cert in (None, "c1-other", "c3"):  # none, another CA's, expired
        with client(server, mtls(pki, cert)) as stranger, \
                pytest.raises(RemoteError) as refused:
            stranger.register("c1")
        assert refused.value.code is grpc.StatusCode.UNAVAILABLE, (cert, refused.value)
    with client(server, None) as plaintext, pytest.raises(RemoteError):
        plaintext.register("c1")
    assert handler_lines(server) == [], "a handler ran for a refused handshake"
    assert health_status(server, mtls(pki, "c2"), CALL_TIMEOUT) == \
        health_pb2.HealthCheckResponse.SERVING

    with client(server, mtls(pki, "c2")) as c2:
        with pytest.raises(errors.PermissionDeniedError, match="'c2'"):
            c2.register("c1")
        with pytest.raises(errors.PermissionDeniedError):
            c2.get_model("c1", 0)
        with pytest.raises(errors.PermissionDeniedError):
            c2.send_update("c1", 1, model(), 2**40)
    assert "client c1 registered" not in server.log()

    pem = {name: ("--tls-ca", str(pki / certs.CA_CERT), "--tls-cert", str(pki / f"{name}.pem"),
                  "--tls-key", str(pki / f"{name}-key.pem")) for name in ("c1", "c2")}
    runs = [client_factory(name, server, *pem[name]) for name in ("c1", "c2")]
    for run in runs:
        assert run.wait(EXIT_TIMEOUT) == 0, run.log()
    [record] = server.wait_for_rounds(1)
    assert record["num_updates"] == 2
    assert record["total_examples"] == 2 * 200, record  # not 2**40
    assert server.process.wait(EXIT_TIMEOUT) == 0, server.log()


# -- tokens ------------------------------------------------------------------------


@pytest.fixture
def enrolled(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A state dir with alice and bob enrolled (`paramserver token add`)."""
    state = tmp_path / "state"
    tokens = {name: run_cli("token", "add", name, "--state-dir", str(state)).strip()
              for name in ("alice", "bob")}
    assert run_cli("token", "list", "--state-dir", str(state)).split() == ["alice", "bob"]
    stored = (state / "tokens.json").read_text()
    for token in tokens.values():
        assert token.split(":", 1)[1] not in stored  # only a salted hash is kept
    return state, tokens


def bearer(token: str | None) -> ClientCredentials:
    return ClientCredentials(token=token)


@pytest.mark.timeout(300)
def test_tokens_refuse_the_outside_checks_attacks(
        server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path,
        enrolled: tuple[Path, dict[str, str]]) -> None:
    state, tokens = enrolled
    server = server_factory("--capacity", "2", clients=2, rounds=1, state_dir=state)

    def refusal(credentials: ClientCredentials, call: str, name: str) -> tuple[str, str]:
        with client(server, credentials) as caller:
            calls: dict[str, Callable[[], object]] = {
                "register": lambda: caller.register(name),
                "model": lambda: caller.get_model(name, 0),
                "next": lambda: caller.next_round(name, 0),
                "update": lambda: caller.send_update(name, 1, model(), 2**40)}
            with pytest.raises(errors.ParamServerError) as refused:
                calls[call]()
        return type(refused.value).__name__, str(refused.value)

    # Missing and wrong tokens: UNAUTHENTICATED for every call, the same
    # answer for an enrolled name and a made-up one (no name probing).
    for credentials in (bearer(None), bearer("alice:not-the-secret"), bearer("zed:whatever")):
        for call in ("register", "model", "next", "update"):
            answers = {refusal(credentials, call, name) for name in ("alice", "zed")}
            assert len(answers) == 1, answers
            [(kind, _)] = answers
            assert kind == "UnauthenticatedError", (call, answers)
    # Another client's token: PERMISSION_DENIED, also for the 2**40 poisoning.
    for call in ("register", "model", "update"):
        kind, message = refusal(bearer(tokens["bob"]), call, "alice")
        assert kind == "PermissionDeniedError", (call, message)
        assert "'bob'" in message, (call, message)
    # Capacity squatting: 64 made-up names without a token fill nothing.
    for i in range(64):
        assert refusal(bearer(None), "register", f"squatter{i}")[0] == "UnauthenticatedError"
    assert health_status(server, None, CALL_TIMEOUT) == health_pb2.HealthCheckResponse.SERVING
    assert " registered" not in server.log(), "a caller without a valid token registered"

    files = {}
    for name, token in tokens.items():
        files[name] = tmp_path / f"{name}.token"
        files[name].write_text(token + "\n")
    runs = [client_factory(name, server, "--token-file", str(files[name])) for name in tokens]
    for run in runs:
        assert run.wait(EXIT_TIMEOUT) == 0, run.log()
    [record] = server.wait_for_rounds(1)
    assert (record["num_updates"], record["total_examples"]) == (2, 400), record
    assert server.process.wait(EXIT_TIMEOUT) == 0, server.log()


# -- idle streams ------------------------------------------------------------------


IDLE_STREAMS = 300


@contextlib.contextmanager
def idle_uploads(server: ServerProcess, credentials: ClientCredentials | None,
                 count: int) -> Iterator[Sequence[grpc.Future[pb.SendUpdateResponse]]]:
    """`count` SendUpdate streams that never send a message, until the block ends."""
    release = threading.Event()

    def nothing() -> Iterator[bytes]:
        release.wait(EXIT_TIMEOUT)
        return
        yield b""  # a generator that yields nothing

    with contextlib.closing(open_channel(server.address, credentials, [])) as channel:
        call = channel.stream_unary("/paramserver.v1.ParameterServer/SendUpdate",
                                    lambda b: b, pb.SendUpdateResponse.FromString)
        futures = [call.future(nothing(), timeout=EXIT_TIMEOUT) for _ in range(count)]
        try:
            yield futures
        finally:
            release.set()
            for future in futures:
                future.cancel()


def codes(futures: Sequence[grpc.Future[pb.SendUpdateResponse]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for future in futures:
        if future.done() and not future.cancelled():
            error = future.exception()
            name = "OK" if error is None else error.code().name  # type: ignore[attr-defined]
            counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.timeout(300)
@pytest.mark.parametrize("auth", ["tokens", "none"])
def test_idle_upload_streams_starve_nobody(
        server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path,
        enrolled: tuple[Path, dict[str, str]], auth: str) -> None:
    """300 upload streams that never send a message: past the limits (per
    client with tokens, uploads overall without) they are refused at once;
    the ones held are cancelled after --stream-idle-timeout; meanwhile a real
    client registers and the health check answers, both promptly."""
    state, tokens = enrolled
    if auth == "none":
        (state / "tokens.json").unlink()
    server = server_factory("--capacity", "16", "--stream-idle-timeout", "3",
                            clients=1, rounds=1, state_dir=state)
    attacker = bearer(tokens["bob"]) if auth == "tokens" else None
    held = 4 if auth == "tokens" else 16
    with idle_uploads(server, attacker, IDLE_STREAMS) as futures:
        wait_for(lambda: codes(futures).get("RESOURCE_EXHAUSTED") == IDLE_STREAMS - held,
                 EXIT_TIMEOUT, f"{IDLE_STREAMS - held} refusals: {codes(futures)}")
        assert health_status(server, None, 5.0) == health_pb2.HealthCheckResponse.SERVING
        with ParameterServerClient(server.address, timeout=5.0, retry=ONCE,
                                   credentials=bearer(tokens["alice"])) as alice:
            assert alice.register("alice").first_round == 1
        # The streams held past the limit are dropped by the watchdog.
        wait_for(lambda: codes(futures).get("CANCELLED") == held, EXIT_TIMEOUT,
                 f"{held} idle streams cancelled: {codes(futures)}")
    assert "sent nothing for 3 s: cancelled" in server.log()
    files = tmp_path / "alice.token"
    files.write_text(tokens["alice"])
    run = client_factory("alice", server, "--token-file", str(files))
    assert run.wait(EXIT_TIMEOUT) == 0, run.log()
    assert server.wait_for_rounds(1)[0]["num_updates"] == 1
    assert "Traceback" not in read_log(server.log_path)
