"""Every error paramserver raises on purpose: one root, narrow subclasses.

Each subclass carries the data that names the problem (round, client, tensor),
so the transport can map it to one gRPC status code and a precise message.
This module imports nothing from paramserver and nothing outside the standard
library.
"""

from __future__ import annotations

from collections.abc import Iterable

# Values quoted in messages are cut to this many characters: a message names
# what is wrong, and a peer's 1 MB tensor name must not make it 1 MB.
QUOTE_LIMIT = 80
# A message lists at most this many items of a list, then says how many more.
LIST_LIMIT = 3


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """repr(value), cut to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def listing(values: Iterable[object], limit: int = LIST_LIMIT) -> str:
    """The first `limit` values quoted, then how many more there are."""
    items = list(values)
    shown = ", ".join(quote(v) for v in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"[{shown}{more}]"


class ParamServerError(Exception):
    """Root of every error paramserver raises on purpose."""


class UnknownClientError(ParamServerError):
    """A call names a client_id that never registered."""

    def __init__(self, client_id: str) -> None:
        super().__init__(f"unknown client {quote(client_id)}: call RegisterClient first")
        self.client_id = client_id


class InvalidClientNameError(ParamServerError):
    """A client name that is empty, too long or has characters outside the set."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"invalid client name {quote(name)}: {why}")
        self.name = name


class RoundError(ParamServerError):
    """An update or request for a round that is not the one it must be."""

    def __init__(self, message: str, *, client_id: str, round: int, open_round: int) -> None:
        super().__init__(message)
        self.client_id = client_id
        self.round = round
        self.open_round = open_round


class StaleRoundError(RoundError):
    """The round named has already closed."""

    def __init__(self, client_id: str, round: int, open_round: int) -> None:
        super().__init__(
            f"round {round} is closed (open round is {open_round}); client {quote(client_id)} "
            "must fetch the latest global model and re-sync",
            client_id=client_id, round=round, open_round=open_round,
        )


class FutureRoundError(RoundError):
    """The round named has not opened yet."""

    def __init__(self, client_id: str, round: int, open_round: int) -> None:
        super().__init__(
            f"round {round} has not opened yet (open round is {open_round})",
            client_id=client_id, round=round, open_round=open_round,
        )


class NotInCohortError(RoundError):
    """The client (re-)registered after the round opened, or dropped out of an
    earlier round, so it is not part of this one."""

    def __init__(self, client_id: str, round: int, open_round: int) -> None:
        super().__init__(
            f"client {quote(client_id)} is not in the cohort of round {round} (it joined after "
            f"the round opened or dropped out earlier); register again and take part "
            f"from round {round + 1}",
            client_id=client_id, round=round, open_round=open_round,
        )


class RunFinishedError(RoundError):
    """The server has run all its rounds."""

    def __init__(self, client_id: str, round: int, open_round: int) -> None:
        super().__init__(
            f"round {round} is past the end of the run (last round is {open_round - 1})",
            client_id=client_id, round=round, open_round=open_round,
        )


class EvaluationClosedError(RoundError):
    """An evaluation report nobody asked for, or for an evaluation that has closed."""

    def __init__(self, client_id: str, round: int) -> None:
        super().__init__(
            f"client {quote(client_id)} was not asked to evaluate the model of round {round}, "
            "or that evaluation has closed", client_id=client_id, round=round, open_round=0)


class ConflictingUpdateError(ParamServerError):
    """A second, different update from a client for a round it already sent."""

    def __init__(self, client_id: str, round: int) -> None:
        super().__init__(
            f"client {quote(client_id)} already sent a different update for round {round}; "
            "the first one is kept"
        )
        self.client_id = client_id
        self.round = round


class MalformedUpdateError(ParamServerError):
    """An update or model that does not match what it must be.

    `tensor` names the offending tensor where there is one.
    """

    def __init__(self, message: str, *, tensor: str | None = None) -> None:
        super().__init__(f"tensor {quote(tensor)}: {message}" if tensor is not None else message)
        self.tensor = tensor


class DecodeError(MalformedUpdateError):
    """Bytes or messages that cannot be decoded into tensors."""


class AveragingError(ParamServerError):
    """The updates cannot be averaged (zero total weight, no updates)."""


class CapacityError(ParamServerError):
    """The server already has as many clients as it accepts."""

    def __init__(self, capacity: int) -> None:
        super().__init__(f"server is at its capacity of {capacity} clients")
        self.capacity = capacity


class RoundAbortedError(ParamServerError):
    """The round was aborted; its updates were discarded."""

    def __init__(self, round: int) -> None:
        super().__init__(f"round {round} was aborted")
        self.round = round


class ShuttingDownError(ParamServerError):
    """The server is shutting down; retry against its successor."""

    def __init__(self) -> None:
        super().__init__("server is shutting down; retry")


class CredentialsUnavailableError(ParamServerError):
    """The server cannot read its enrolled clients (a damaged tokens.json):
    every call is refused until its operator repairs the file, which the
    server re-reads at the next call. Retry later."""


class StorageError(ParamServerError):
    """The state dir cannot be written (full, read-only, I/O error). Nothing
    was acknowledged: send the identical update again (if it had been counted
    before the write that failed, the retry is acknowledged as a duplicate)."""

    def __init__(self, what: str, error: OSError) -> None:
        reason = error.strerror or str(error)
        super().__init__(f"cannot write the server's state ({what}): {reason}; not "
                         "acknowledged: retry the identical call")
        self.errno = error.errno


class CallEndedError(ParamServerError):
    """The call was cancelled or its deadline passed before the update was
    committed: it does not count."""

    def __init__(self, round: int) -> None:
        super().__init__(f"the upload for round {round} ended (cancelled or past its "
                         "deadline) before it was committed; it does not count")
        self.round = round


class WaitTimeoutError(ParamServerError):
    """The client's own limit on waiting at the barrier passed (DEADLINE_EXCEEDED
    of a call that waits for a round to close); the round may still close."""

    def __init__(self, round: int) -> None:
        super().__init__(f"round {round} did not close within the time this client waits")
        self.round = round


class ModelMismatchError(MalformedUpdateError):
    """A client's model is not the server's (refused at registration)."""


class PayloadTooLargeError(ParamServerError):
    """A payload too large for a unary call; the streaming RPCs take any size."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload of {size} bytes is over the unary limit of {limit} bytes; "
                         "use the streaming RPC")
        self.size = size
        self.limit = limit


class UnauthenticatedError(ParamServerError):
    """A call without a valid credential while authentication is on. Says
    nothing about which client names exist."""

    def __init__(self, why: str = "missing or invalid credentials") -> None:
        super().__init__(f"unauthenticated: {why}")


class PermissionDeniedError(ParamServerError):
    """An authenticated caller acting as another client (its credential names
    `principal`, the request names someone else)."""

    def __init__(self, principal: str) -> None:
        super().__init__(f"the caller is authenticated as {quote(principal)} and may act only "
                         "as that client")
        self.client_id = principal


class LimitExceededError(ParamServerError):
    """A per-caller limit (concurrent calls, payload size) was reached."""


class SecAggError(ParamServerError):
    """Secure aggregation cannot go on: too few survivors, a malformed or
    inconsistent share, key or masked vector."""


class SecAggAbortedError(SecAggError):
    """A secure-aggregation round was aborted (fewer than the threshold of
    clients left, or the round's deadline passed)."""

    def __init__(self, round: int, why: str) -> None:
        super().__init__(f"secure aggregation of round {round} aborted: {why}")
        self.round = round
