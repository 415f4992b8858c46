"""What a server runs: its configuration, in one place (the command line and
`serve --config FILE.toml` build it; create_server takes it).

Imports the pure modules only; no grpc, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from paramserver import codec
from paramserver.quantize import Quantization
from paramserver.sampling import Sampling
from paramserver.strategies import FedAvg, Strategy

Evaluator = Callable[[Mapping[str, torch.Tensor]], Mapping[str, float]]


@dataclass(frozen=True)
class TlsConfig:
    """PEM bytes: the server's certificate and key; with `client_ca`, clients
    must present a certificate from that CA (mTLS)."""

    cert: bytes
    key: bytes = field(repr=False)
    client_ca: bytes | None = None


@dataclass(frozen=True)
class Limits:
    """`per_client`: calls one authenticated client may have open at once
    (any RPC but health). `uploads`: client streams open at once, all
    callers together (a stream holds a server thread while it waits for its
    messages). `idle_timeout`: seconds a client stream may go without sending
    a message, the first one included, before it is cancelled."""

    per_client: int = 4
    uploads: int = 256
    idle_timeout: float = 10.0


@dataclass(frozen=True)
class SecAggSettings:
    """Secure aggregation (serve --secagg). `threshold`: shares needed to
    rebuild a secret (None: a strict majority of a neighbourhood);
    `neighbours`: the SecAgg+ graph's degree (0: the full graph);
    `stage_timeout`: seconds each key or unmasking stage waits for clients
    that neither answer nor leave."""

    quantization: Quantization = field(default_factory=Quantization)
    threshold: int | None = None
    neighbours: int = 0
    stage_timeout: float = 60.0


@dataclass
class ServerConfig:
    """`clients` and `min_clients` are `serve --clients` and `--min-clients`."""

    clients: int = 2  # registrations round 1 waits for
    total_rounds: int = 0
    capacity: int = 256
    round_timeout: float | None = None  # from a round's first update; see rounds.py
    min_clients: int = 1  # updates a round needs to close at its deadline (quorum)
    chunk_size: int = codec.DEFAULT_CHUNK_SIZE
    state_dir: Path | None = None
    durable: bool = True  # fsync every acknowledged update and published model
    round_log: Path | None = None  # JSON lines, one per published round
    evaluator: Evaluator | None = field(default=None, repr=False)
    # After the last round, the final model is served until every active client
    # has fetched it, or for at most this many seconds; then `on_finished`.
    linger: float = 30.0
    fresh: bool = False  # discard what the state dir holds (once it is locked)
    on_finished: Callable[[], None] | None = field(default=None, repr=False)
    # Called (from the failing thread) when the server cannot go on: e.g. an
    # aggregation could not read its updates. The coordinator has already stopped.
    on_failure: Callable[[BaseException], None] | None = field(default=None, repr=False)
    # Called with False when the state dir stops taking writes, True when it
    # takes them again.
    on_storage: Callable[[bool], None] | None = field(default=None, repr=False)
    strategy: Strategy = field(default_factory=FedAvg)
    # Called with every record the round log writes (progress displays).
    on_record: Callable[[Mapping[str, object]], None] | None = field(default=None, repr=False)
    # Client sampling (None: every active client, every round); a round after
    # the first opens once min_available clients are active (0: min_clients).
    sampling: Sampling | None = None
    min_available: int = 0
    # Federated evaluation of every k-th global model (0: none), by a cohort
    # drawn with `evaluation_sampling` (None: every active client).
    evaluate_every: int = 0
    evaluation_sampling: Sampling | None = None
    tls: TlsConfig | None = None  # None: plaintext (loopback, or serve --insecure)
    limits: Limits = field(default_factory=Limits)
    secagg: SecAggSettings | None = None

    @property
    def assigns_rounds(self) -> bool:
        """Whether clients must ask for each round (NextRound)."""
        return (self.sampling is not None or self.evaluate_every > 0 or self.secagg is not None
                or bool(self.strategy.round_config(1)))
