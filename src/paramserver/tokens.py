"""Per-client bearer tokens: `paramserver token add NAME` makes one, prints it
once, and keeps only a salted hash in the state dir (tokens.json).

A token reads `NAME:SECRET`: the name says which hash to compare against (one
hash per call, not one per enrolled client), the 256-bit secret is what proves
it. The comparison is constant-time, and a token for a name that is not
enrolled costs the same hash and comparison as one that is, so the answer and
its timing say nothing about which names exist.

No grpc here; the transport (security.py) reads the token from the call's
metadata and asks `TokenStore.verify`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from paramserver.errors import ParamServerError
from paramserver.rounds import check_name
from paramserver.state import TOKENS_FILE, write_atomic

SECRET_BYTES = 32
SALT_BYTES = 16
# The longest token we hash: a name (64) + ":" + a secret (43). Anything much
# longer is refused before it costs a hash.
MAX_TOKEN_LENGTH = 256


class TokenFileError(ParamServerError):
    """tokens.json cannot be read or written."""


@dataclass(frozen=True)
class Enrolled:
    salt: bytes
    digest: bytes


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


# Compared against when the name is not enrolled, so that an unknown name costs
# what a known one does.
_DECOY = Enrolled(bytes(SALT_BYTES), _digest(bytes(SALT_BYTES), "decoy"))


class TokenStore:
    """The enrolled clients of one state dir. Re-reads the file when it
    changes, so `token add` and `token remove` take effect on a running
    server at its next call."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / TOKENS_FILE
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._enrolled: dict[str, Enrolled] = {}

    def names(self) -> list[str]:
        return sorted(self._current())

    def enabled(self) -> bool:
        """Whether any client is enrolled (then every call needs a token)."""
        return bool(self._current())

    def add(self, name: str) -> str:
        """Enrols `name` (replacing its old token) and returns its new token,
        the only time it exists in clear. Raises InvalidClientNameError."""
        check_name(name)
        secret = secrets.token_urlsafe(SECRET_BYTES)
        salt = secrets.token_bytes(SALT_BYTES)
        enrolled = {**self._read(), name: Enrolled(salt, _digest(salt, secret))}
        self._write(enrolled)
        return f"{name}:{secret}"

    def remove(self, name: str) -> bool:
        enrolled = self._read()
        if enrolled.pop(name, None) is None:
            return False
        self._write(enrolled)
        return True

    def verify(self, token: str) -> str | None:
        """The client a token belongs to, or None. Constant-time in the secret."""
        name, _, secret = token.partition(":")
        if len(token) > MAX_TOKEN_LENGTH or not secret:
            return None
        entry = self._current().get(name)
        known = entry is not None
        entry = entry or _DECOY
        matches = hmac.compare_digest(_digest(entry.salt, secret), entry.digest)
        return name if matches and known else None

    def _current(self) -> Mapping[str, Enrolled]:
        try:
            info = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (info.st_mtime_ns, info.st_ino, info.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._enrolled = self._read() if stamp is not None else {}
                self._stamp = stamp
            return self._enrolled

    def _read(self) -> dict[str, Enrolled]:
        try:
            raw = json.loads(self.path.read_text())
            return {name: Enrolled(bytes.fromhex(e["salt"]), bytes.fromhex(e["sha256"]))
                    for name, e in raw["clients"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            raise TokenFileError(f"cannot read the enrolled clients from {self.path}: "
                                 f"{error}") from None

    def _write(self, enrolled: Mapping[str, Enrolled]) -> None:
        document = {"clients": {name: {"salt": e.salt.hex(), "sha256": e.digest.hex()}
                                for name, e in sorted(enrolled.items())}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(document, indent=1).encode())
            os.chmod(self.path, 0o600)
        except OSError as error:
            raise TokenFileError(f"cannot write {self.path}: {error.strerror or error}") from None

