"""The command line's security part: TLS and token options of `serve` and
`client`, the rule that plaintext stays on loopback, and the `certs` and
`token` commands. cli.py wires these in; every mistake raises SetupError,
which cli.py reports as a usage error (one line, exit 2).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

from paramserver import certs, errors
from paramserver.config import Limits, SecAggSettings, TlsConfig
from paramserver.quantize import Quantization
from paramserver.security import ClientCredentials
from paramserver.tokens import TokenFileError, TokenStore

log = logging.getLogger("paramserver")

TOKEN_ENV = "PARAMSERVER_TOKEN"


class SetupError(Exception):
    """A security option that cannot work as given."""


def add_serve_args(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("security")
    group.add_argument("--tls-cert", type=Path, help="the server's certificate (PEM): serve TLS")
    group.add_argument("--tls-key", type=Path, help="the key of --tls-cert (PEM)")
    group.add_argument("--client-ca", type=Path,
                       help="require client certificates from this CA (mTLS); a client's name "
                            "is its certificate's subject CN")
    group.add_argument("--insecure", action="store_true",
                       help="allow serving plaintext on an address other than loopback")
    group.add_argument("--max-streams-per-client", type=int, default=Limits.per_client,
                       help="calls one authenticated client may have open at once")
    group.add_argument("--stream-idle-timeout", type=float, default=Limits.idle_timeout,
                       help="seconds an upload stream may send nothing (its first message "
                            "included) before it is cancelled")
    secagg = serve.add_argument_group("secure aggregation (Bonawitz et al. 2017)")
    secagg.add_argument("--secagg", action="store_true",
                        help="the server sees only masked updates and their sum (fedavg or "
                             "fedprox; needs --round-timeout)")
    secagg.add_argument("--secagg-threshold", type=int,
                        help="shares that rebuild a secret (default: a strict majority of a "
                             "neighbourhood)")
    secagg.add_argument("--secagg-neighbours", type=int, default=0,
                        help="SecAgg+ (Bell et al. 2020): each client's neighbours on a "
                             "random graph of this even degree; 0 = everyone")
    secagg.add_argument("--secagg-bits", type=int, default=Quantization.bits,
                        help="sums are taken mod 2**bits")
    secagg.add_argument("--secagg-frac-bits", type=int, default=Quantization.frac_bits,
                        help="fixed-point fractional bits")
    secagg.add_argument("--secagg-clip", type=float, default=Quantization.clip,
                        help="values are clipped to [-clip, clip] before quantising")
    secagg.add_argument("--secagg-timeout", type=float, default=SecAggSettings.stage_timeout,
                        help="seconds a key or unmasking stage waits for clients that "
                             "neither answer nor leave")


def add_client_args(client: argparse.ArgumentParser) -> None:
    group = client.add_argument_group("security")
    group.add_argument("--tls-ca", type=Path,
                       help="connect with TLS, trusting servers certified by this CA (PEM)")
    group.add_argument("--tls-cert", type=Path, help="this client's certificate (PEM), for mTLS")
    group.add_argument("--tls-key", type=Path, help="the key of --tls-cert (PEM)")
    group.add_argument("--token-file", type=Path,
                       help=f"a file holding this client's token (paramserver token add); "
                            f"or set {TOKEN_ENV}")
    client.add_argument("--save-quantized", type=Path, metavar="DIR",
                        help="with secure aggregation: keep each round's quantised update "
                             "(before masking) as DIR/NAME-round-R.npy")


def add_commands(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
                 parent: argparse.ArgumentParser, formatter: type[argparse.HelpFormatter],
                 ) -> None:
    made = sub.add_parser("certs", help="make a CA, a server certificate and client "
                          "certificates (for tests and demos)", parents=[parent],
                          formatter_class=formatter)
    made.add_argument("dir", type=Path, help="where to write them (an existing CA is reused)")
    made.add_argument("--clients", nargs="+", default=[], metavar="NAME",
                      help="a certificate for each client name (its subject CN)")
    made.add_argument("--host", action="append", default=[],
                      help="a host name or address the server certificate also covers "
                           "(localhost, 127.0.0.1 and ::1 always)")
    made.add_argument("--days", type=float, default=365.0, help="validity")
    token = sub.add_parser("token", help="enrol clients: bearer tokens kept as salted hashes "
                           "in the state dir", parents=[parent], formatter_class=formatter)
    token.add_argument("action", choices=["add", "remove", "list"])
    token.add_argument("name", nargs="?", help="the client's name (add, remove)")
    token.add_argument("--state-dir", type=Path, default=Path("paramserver-state"),
                       help="the server's state dir")


def validate_serve(args: argparse.Namespace) -> None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SetupError("--tls-cert and --tls-key go together")
    if args.client_ca is not None and args.tls_cert is None:
        raise SetupError("--client-ca needs --tls-cert and --tls-key (mTLS is TLS)")
    if args.max_streams_per_client < 1:
        raise SetupError("--max-streams-per-client must be at least 1")
    if not args.stream_idle_timeout > 0:
        raise SetupError("--stream-idle-timeout must be positive")
    if args.secagg:
        _validate_secagg(args)
    if (args.unix_socket is None and args.tls_cert is None and not _loopback(args.host)
            and not args.insecure):
        raise SetupError(f"--host {args.host} is not loopback: serve TLS (--tls-cert, "
                         "--tls-key, and --client-ca or enrolled tokens) or say --insecure")


SECAGG_STRATEGIES = ("fedavg", "fedprox")


def _validate_secagg(args: argparse.Namespace) -> None:
    if args.strategy not in SECAGG_STRATEGIES:
        raise SetupError(f"--secagg sums updates: it works with {', '.join(SECAGG_STRATEGIES)}, "
                         f"not {args.strategy} (which needs each update, or a server "
                         "optimizer's state)")
    if not args.round_timeout:
        raise SetupError("--secagg needs --round-timeout: a client that drops before sending "
                         "its masked update is left out only at the round's deadline")
    if args.clients < 2:
        raise SetupError("--secagg needs --clients 2 or more (one client's sum is its update)")
    if args.secagg_neighbours < 0 or args.secagg_neighbours % 2:
        raise SetupError("--secagg-neighbours must be an even number, 0 for everyone")
    if args.secagg_threshold is not None and args.secagg_threshold < 1:
        raise SetupError("--secagg-threshold must be at least 1")
    if not args.secagg_timeout > 0:
        raise SetupError("--secagg-timeout must be positive")
    secagg_settings(args)  # the quantisation's own checks


def secagg_settings(args: argparse.Namespace) -> SecAggSettings | None:
    if not args.secagg:
        return None
    try:
        q = Quantization(args.secagg_bits, args.secagg_frac_bits, args.secagg_clip)
    except errors.SecAggError as error:
        raise SetupError(f"--secagg-bits/--secagg-frac-bits/--secagg-clip: {error}") from None
    return SecAggSettings(q, args.secagg_threshold, args.secagg_neighbours, args.secagg_timeout)


def validate_client(args: argparse.Namespace) -> None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SetupError("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        raise SetupError("--tls-cert needs --tls-ca (the CA that certified the server)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_insecure(args: argparse.Namespace) -> None:
    if args.insecure and args.tls_cert is None and not _loopback(args.host):
        log.warning("serving plaintext on %s (--insecure): anyone on the network can read "
                    "and forge every model and update", args.host)


def server_tls(args: argparse.Namespace) -> TlsConfig | None:
    if args.tls_cert is None:
        return None
    return TlsConfig(_read(args.tls_cert), _read(args.tls_key),
                     _read(args.client_ca) if args.client_ca is not None else None)


def limits(args: argparse.Namespace) -> Limits:
    return Limits(per_client=args.max_streams_per_client, uploads=args.capacity,
                  idle_timeout=args.stream_idle_timeout)


def client_credentials(args: argparse.Namespace) -> ClientCredentials | None:
    token = _token(args)
    if args.tls_ca is None and token is None:
        return None
    return ClientCredentials(
        ca=_read(args.tls_ca) if args.tls_ca is not None else None,
        cert=_read(args.tls_cert) if args.tls_cert is not None else None,
        key=_read(args.tls_key) if args.tls_key is not None else None, token=token)


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        text = _read(args.token_file).decode(errors="replace").strip()
        if not text:
            raise SetupError(f"--token-file {args.token_file} is empty")
        return text
    return os.environ.get(TOKEN_ENV) or None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise SetupError(f"{path}: {error.strerror or error}") from None


def run_certs(args: argparse.Namespace) -> int:
    try:
        written = certs.make_all(args.dir, args.clients, args.host, args.days)
    except (certs.CertificateError, errors.InvalidClientNameError, OSError) as error:
        raise SetupError(str(error)) from None
    for path in written:
        print(path)
    return 0


def run_token(args: argparse.Namespace) -> int:
    store = TokenStore(args.state_dir)
    try:
        if args.action == "list":
            for name in store.names():
                print(name)
            return 0
        if args.name is None:
            raise SetupError(f"token {args.action} needs a client name")
        if args.action == "add":
            # The only time the token exists in clear: give it to the client.
            print(store.add(args.name))
            return 0
        if not store.remove(args.name):
            raise SetupError(f"{args.name!r} is not enrolled in {args.state_dir}")
    except (TokenFileError, errors.InvalidClientNameError) as error:
        raise SetupError(str(error)) from None
    return 0
