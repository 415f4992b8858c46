"""Tokens, certificates, the per-caller limits, the idle-stream watchdog and
the security options of the command line."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from cryptography import x509
from unit_fakes import FakeClock

from paramserver import certs, cli, security
from paramserver.config import Limits
from paramserver.errors import (
    CredentialsUnavailableError,
    InvalidClientNameError,
    LimitExceededError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from paramserver.state import StateDir
from paramserver.tokens import TokenStore


def test_a_token_verifies_as_its_client_only(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    alice, bob = store.add("alice"), store.add("bob")
    assert store.verify(alice) == "alice"
    assert store.verify(bob) == "bob"
    _name, _, secret = alice.partition(":")
    for forged in (f"bob:{secret}", f"alice:{secret}x", "alice:", "zed:" + secret, "",
                   "alice", "x" * 10_000):
        assert store.verify(forged) is None, forged
    stored = (tmp_path / "tokens.json").read_text()
    assert secret not in stored
    assert (tmp_path / "tokens.json").stat().st_mode & 0o077 == 0


def test_a_new_token_replaces_the_old_and_removal_takes_effect_at_once(tmp_path: Path) -> None:
    store, other_view = TokenStore(tmp_path), TokenStore(tmp_path)  # e.g. CLI and server
    old = store.add("alice")
    assert other_view.verify(old) == "alice"
    new = store.add("alice")
    assert other_view.verify(old) is None
    assert other_view.verify(new) == "alice"
    assert store.remove("alice")
    assert not store.remove("alice")
    assert other_view.verify(new) is None
    assert other_view.names() == []


def test_token_names_are_client_names(tmp_path: Path) -> None:
    with pytest.raises(InvalidClientNameError):
        TokenStore(tmp_path).add("no spaces")


def test_authenticators() -> None:
    class Store:
        def verify(self, token: str) -> str | None:
            return "alice" if token == "alice:s" else None

    tokens = security.Tokens(Store())  # type: ignore[arg-type]
    assert tokens.principal([("authorization", "Bearer alice:s")], {}) == "alice"
    for metadata in ([], [("authorization", "alice:s")], [("authorization", "Bearer bob:s")]):
        with pytest.raises(UnauthenticatedError):
            tokens.principal(metadata, {})
    mtls = security.Certificates()
    assert mtls.principal(None, {"x509_common_name": [b"c1"]}) == "c1"
    for context in ({}, {"x509_common_name": [b"a", b"b"]}, {"x509_common_name": [b"\xff"]}):
        with pytest.raises(UnauthenticatedError):
            mtls.principal(None, context)
    assert security.Open().principal(None, {}) is None


def test_an_authenticated_caller_acts_only_for_itself() -> None:
    security.check_identity(None, "anyone")  # no authentication: taken on trust
    security.check_identity("alice", "alice")
    with pytest.raises(PermissionDeniedError, match="'alice'"):
        security.check_identity("alice", "bob")


def test_tokens_stay_on_once_enrolled(tmp_path: Path) -> None:
    assert isinstance(security.authenticator_for(False, tmp_path), security.Open)
    store = TokenStore(tmp_path)
    store.add("alice")
    store.remove("alice")  # an emptied file locks everyone out, it does not open up
    assert isinstance(security.authenticator_for(False, tmp_path), security.Tokens)
    assert isinstance(security.authenticator_for(True, tmp_path), security.Certificates)


@pytest.mark.parametrize("damage", [b"{", b"[" * 100_000, b'{"clients": []}'])
def test_a_damaged_token_file_refuses_every_call_until_repaired(tmp_path: Path,
                                                                damage: bytes) -> None:
    store = TokenStore(tmp_path)
    token = store.add("alice")
    good = store.path.read_bytes()
    authenticator = security.authenticator_for(False, tmp_path)
    metadata = [(security.AUTH_METADATA, security.BEARER + token)]
    store.path.write_bytes(damage)
    with pytest.raises(CredentialsUnavailableError) as refused:
        authenticator.principal(metadata, {})
    assert str(tmp_path) not in str(refused.value), "the caller learns the server's paths"
    store.path.write_bytes(good + b" ")  # repaired (a new size: the reload sees it)
    assert authenticator.principal(metadata, {}) == "alice"


def test_fresh_keeps_the_enrolled_clients(tmp_path: Path) -> None:
    TokenStore(tmp_path).add("alice")
    state = StateDir(tmp_path)
    try:
        state.clear()
    finally:
        state.close()
    assert TokenStore(tmp_path).names() == ["alice"]


def test_call_limits_per_client_and_for_uploads() -> None:
    counter = security.CallCounter(Limits(per_client=2, uploads=3))
    counter.enter("alice", "NextRound", upload=False)
    counter.enter("alice", "SendUpdate", upload=True)
    with pytest.raises(LimitExceededError, match="'alice' already has 2 calls open"):
        counter.enter("alice", "SendUpdate", upload=True)
    counter.enter(None, "SendUpdate", upload=True)
    counter.enter("bob", "SendUpdate", upload=True)
    with pytest.raises(LimitExceededError, match="3 uploads are open"):
        counter.enter(None, "SendUpdate", upload=True)
    counter.exit("alice", upload=True)
    counter.enter("alice", "SendUpdate", upload=False)  # a refusal counted nothing


def test_the_watchdog_cancels_only_streams_idle_for_the_timeout() -> None:
    clock = FakeClock()
    watchdog = security.StreamWatchdog(10.0, clock)
    cancelled: list[str] = []
    done = threading.Event()

    def cancel(name: str) -> None:
        cancelled.append(name)
        done.set()

    try:
        idle = watchdog.watch(lambda: cancel("idle"))
        busy = watchdog.watch(lambda: cancel("busy"))
        ended = watchdog.watch(lambda: cancel("ended"))
        ended.close()
        clock.wait_for_sleeper()
        clock.advance(6.0)
        busy.touch()  # a message: its deadline moves to 16
        clock.advance(5.0)  # 11: only `idle` is past its deadline
        assert done.wait(30.0)
        assert cancelled == ["idle"]
        done.clear()
        clock.advance(6.0)  # 17: `busy` went quiet too
        assert done.wait(30.0)
        assert cancelled == ["idle", "busy"]
        assert watchdog.cancelled == 2
        busy.close()
        idle.close()
    finally:
        watchdog.stop()


def test_certificates_name_their_client_and_cover_the_server(tmp_path: Path) -> None:
    written = certs.make_all(tmp_path, ["c1"], hosts=["ps.example"])
    assert {p.name for p in written} == {"ca.pem", "ca-key.pem", "server.pem", "server-key.pem",
                                          "c1.pem", "c1-key.pem"}
    c1 = x509.load_pem_x509_certificate((tmp_path / "c1.pem").read_bytes())
    assert c1.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "c1"
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "ps.example"} <= set(names.get_values_for_type(x509.DNSName))
    assert (tmp_path / "c1-key.pem").stat().st_mode & 0o077 == 0
    again = certs.make_all(tmp_path, ["c2"])  # the CA is reused
    assert tmp_path / "ca.pem" not in again
    c2 = x509.load_pem_x509_certificate((tmp_path / "c2.pem").read_bytes())
    assert c2.issuer == c1.issuer


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "--host", "0.0.0.0"], "not loopback"),
    (["serve", "--tls-cert", "x.pem"], "go together"),
    (["serve", "--client-ca", "ca.pem"], "needs --tls-cert"),
    (["serve", "--max-streams-per-client", "0"], "at least 1"),
    (["client", "c1", "--tls-cert", "c.pem", "--tls-key", "k.pem"], "needs --tls-ca"),
])
def test_security_usage_mistakes_are_one_line(argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.parse_args(argv)
    assert exit.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


def test_plaintext_beyond_loopback_needs_insecure() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        cli.parse_args(["serve", "--host", host])
    cli.parse_args(["serve", "--host", "0.0.0.0", "--insecure"])


def test_the_token_command_prints_a_token_once(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["token", "add", "alice", "--state-dir", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenStore(tmp_path).verify(token) == "alice"
    assert cli.main(["token", "list", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == ["alice"]
    assert cli.main(["token", "remove", "bob", "--state-dir", str(tmp_path)]) == cli.EXIT_USAGE
    assert "not enrolled" in capsys.readouterr().err
    assert json.loads((tmp_path / "tokens.json").read_text())["clients"].keys() == {"alice"}
