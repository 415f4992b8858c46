"""The key material of secure aggregation, as thin checked wrappers over the
`cryptography` package:

- X25519 key pairs drawn from an injected random source;
- key agreement followed by HKDF-SHA256 (32 bytes), whose `info` binds the
  purpose (LABEL_MASK or LABEL_SHARE), the round's context and both public
  keys (sorted, so both ends derive the same key);
- the AES-256-GCM box that carries one client's shares to another.

A box is nonce (12 random bytes) || ciphertext || tag (16 bytes). Its
associated data is frame(context) || frame(sender) || frame(recipient) and its
plaintext is frame(sender) || frame(recipient) || frame(share of s_sk) ||
frame(share of b), where frame(x) = len(x) as 4 bytes big-endian || x, names
are UTF-8 and shares are shamir.share_to_bytes (132 bytes each).

Every failure on a peer's bytes raises SecAggError naming the peer; no other
exception escapes. Pure: imports the standard library, cryptography,
paramserver.errors and paramserver.shamir; no numpy, torch, grpc or I/O.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from paramserver.errors import SecAggError, quote
from paramserver.shamir import Rng, Share, share_from_bytes, share_to_bytes

LABEL_MASK = b"paramserver/secagg/v1/mask"
LABEL_SHARE = b"paramserver/secagg/v1/share"
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
_FRAME = 4


def draw(rng: Rng, size: int) -> bytes:
    """`size` bytes from `rng`, checked: a short read would silently weaken keys."""
    data = rng(size)
    if not isinstance(data, bytes) or len(data) != size:
        raise SecAggError(f"the random source did not return {size} bytes")
    return data


def name_bytes(name: object) -> bytes:
    """A client name as UTF-8. Raises SecAggError for an empty or non-str name."""
    if not isinstance(name, str) or not name:
        raise SecAggError(f"client names must be non-empty strings, got {quote(name)}")
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SecAggError(f"client name {quote(name)} is not valid Unicode") from e


def frame(data: bytes) -> bytes:
    return len(data).to_bytes(_FRAME, "big") + data


def new_private_key(rng: Rng = os.urandom) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(draw(rng, KEY_SIZE))


def private_key_from_bytes(data: bytes) -> X25519PrivateKey:
    """Any 32 bytes are a private key (X25519 clamps them)."""
    if not isinstance(data, bytes) or len(data) != KEY_SIZE:
        raise SecAggError(f"an X25519 private key is {KEY_SIZE} bytes")
    return X25519PrivateKey.from_private_bytes(data)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def check_public_key(data: object, what: str) -> bytes:
    if not isinstance(data, bytes) or len(data) != KEY_SIZE:
        size = f"{len(data)} bytes" if isinstance(data, bytes) else type(data).__name__
        raise SecAggError(f"{what}: an X25519 public key is {KEY_SIZE} bytes, got {size}")
    return data


def agree(own: X25519PrivateKey, peer_public: bytes, peer: str, label: bytes,
          context: bytes) -> bytes:
    """The 32-byte key `own` shares with the holder of `peer_public` for the
    purpose `label` in this round. Raises SecAggError naming `peer` for a
    malformed or low-order public key."""
    check_public_key(peer_public, f"client {quote(peer)}")
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise SecAggError(f"key agreement with client {quote(peer)} failed (a low-order "
                          "public key?)") from e
    low, high = sorted((public_bytes(own), peer_public))
    info = label + frame(context) + low + high
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(shared)


def _associated_data(context: bytes, sender: str, recipient: str) -> bytes:
    return frame(context) + frame(name_bytes(sender)) + frame(name_bytes(recipient))


def seal_shares(key: bytes, context: bytes, sender: str, recipient: str,
                key_share: Share, seed_share: Share, rng: Rng = os.urandom) -> bytes:
    """The box carrying `sender`'s shares of its s_sk and b to `recipient`."""
    plaintext = b"".join(frame(part) for part in (
        name_bytes(sender), name_bytes(recipient),
        share_to_bytes(key_share), share_to_bytes(seed_share)))
    nonce = draw(rng, NONCE_SIZE)
    ad = _associated_data(context, sender, recipient)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def open_shares(key: bytes, context: bytes, sender: str, recipient: str,
                box: object) -> tuple[Share, Share]:
    """(share of s_sk, share of b) from `sender`'s box. Raises SecAggError
    naming the sender if the box is malformed, tampered with, for another
    round or another recipient."""
    whose = f"the shares from client {quote(sender)}"
    if isinstance(box, bytearray | memoryview):
        box = bytes(box)
    if not isinstance(box, bytes) or len(box) < NONCE_SIZE + TAG_SIZE:
        raise SecAggError(f"{whose} are not a box of at least {NONCE_SIZE + TAG_SIZE} bytes")
    ad = _associated_data(context, sender, recipient)
    try:
        plaintext = AESGCM(key).decrypt(box[:NONCE_SIZE], box[NONCE_SIZE:], ad)
    except InvalidTag as e:
        raise SecAggError(f"{whose} do not decrypt: tampered with, or meant for another "
                          "client or round") from e
    parts = _unframe(plaintext, 4, whose)
    if parts[0] != name_bytes(sender) or parts[1] != name_bytes(recipient):
        raise SecAggError(f"{whose} name another sender or recipient")
    try:
        return share_from_bytes(parts[2]), share_from_bytes(parts[3])
    except SecAggError as e:
        raise SecAggError(f"{whose}: {e}") from e


def _unframe(data: bytes, count: int, whose: str) -> list[bytes]:
    parts, at = [], 0
    for _ in range(count):
        size = int.from_bytes(data[at:at + _FRAME], "big")
        end = at + _FRAME + size
        if end > len(data):
            raise SecAggError(f"{whose} are truncated")
        parts.append(data[at + _FRAME:end])
        at = end
    if at != len(data):
        raise SecAggError(f"{whose} have {len(data) - at} trailing bytes")
    return parts
