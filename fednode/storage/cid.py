"""IPFS content identifiers, computed exactly as ``ipfs add --cid-version=1 --raw-leaves`` does.

Kubo's defaults: fixed-size 262144-byte chunks stored as raw (0x55) blocks, joined by a balanced
tree of UnixFS dag-pb (0x70) nodes with at most 174 links each, sha2-256, base32 CIDv1 strings.
A file of one chunk (up to 262144 bytes, the empty file included) is just that raw block.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

CHUNK_SIZE = 262144
MAX_LINKS = 174

CODECS = {"raw": 0x55, "dag-pb": 0x70}
_CODEC_NAMES = {code: name for name, code in CODECS.items()}
_SHA2_256 = 0x12
_DIGEST_SIZE = 32
_UNIXFS_FILE = 2
_MAX_CID_CHARS = 128  # sha2-256 CIDs are 46-59 characters in the encodings accepted here
_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


class CIDError(ValueError):
    """A string or digest that is not a supported CID."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(cid: str, buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while pos < len(buf) and shift < 64:
        byte = buf[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return n, pos
        shift += 7
    raise CIDError(f"not a CID: {cid!r} is truncated")


def _pb_bytes(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _pb_varint(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _cid_bytes(codec: int, digest: bytes) -> bytes:
    return _varint(1) + _varint(codec) + _varint(_SHA2_256) + _varint(_DIGEST_SIZE) + digest


def _to_base32(cid: bytes) -> str:
    return "b" + base64.b32encode(cid).decode("ascii").rstrip("=").lower()


@dataclass(frozen=True)
class _Node:
    """One block of the DAG as its parent links to it."""

    cid: bytes
    tsize: int  # block bytes plus those of every descendant (dag-pb Tsize)
    filesize: int  # file bytes under this node (UnixFS blocksize)


def _leaf(chunk: memoryview) -> _Node:
    return _Node(_cid_bytes(CODECS["raw"], hashlib.sha256(chunk).digest()), len(chunk), len(chunk))


def _branch(children: list[_Node]) -> _Node:
    """A UnixFS File node in canonical dag-pb form: Links (field 2) before Data (field 1)."""
    links = b"".join(
        _pb_bytes(2, _pb_bytes(1, c.cid) + _pb_bytes(2, b"") + _pb_varint(3, c.tsize)) for c in children
    )
    filesize = sum(c.filesize for c in children)
    unixfs = (
        _pb_varint(1, _UNIXFS_FILE)
        + _pb_varint(3, filesize)
        + b"".join(_pb_varint(4, c.filesize) for c in children)
    )
    block = links + _pb_bytes(1, unixfs)
    digest = hashlib.sha256(block).digest()
    return _Node(_cid_bytes(CODECS["dag-pb"], digest), len(block) + sum(c.tsize for c in children), filesize)


def cid_of(data: bytes) -> str:
    """The base32 CIDv1 that ``ipfs add --cid-version=1 --raw-leaves`` (Kubo defaults) gives ``data``."""
    view = memoryview(data)
    level = [_leaf(view[i : i + CHUNK_SIZE]) for i in range(0, max(len(view), 1), CHUNK_SIZE)]
    while len(level) > 1:
        level = [_branch(level[i : i + MAX_LINKS]) for i in range(0, len(level), MAX_LINKS)]
    return _to_base32(level[0].cid)


def _b58decode(cid: str, text: str) -> bytes:
    n = 0
    for char in text:
        if char not in _B58_INDEX:
            raise CIDError(f"not a CID: {cid!r} has non-base58btc character {char!r}")
        n = n * 58 + _B58_INDEX[char]
    zeros = len(text) - len(text.lstrip("1"))
    return b"\0" * zeros + n.to_bytes((n.bit_length() + 7) // 8, "big")


def _b32decode(cid: str) -> bytes:
    body = cid[1:].upper()
    try:
        return base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError:
        raise CIDError(f"not a CID: {cid!r} is not valid base32") from None


def _parse(cid: str) -> tuple[int, bytes]:
    """(codec, sha2-256 digest) of a base32/base58btc CIDv1 or a CIDv0 string."""
    if not isinstance(cid, str) or not 0 < len(cid) <= _MAX_CID_CHARS:
        raise CIDError(f"not a CID: {cid!r:.100}")
    if len(cid) == 46 and cid.startswith("Qm"):
        codec, multihash = CODECS["dag-pb"], _b58decode(cid, cid)
    else:
        if cid[0] in "bB":
            raw = _b32decode(cid)
        elif cid[0] == "z":
            raw = _b58decode(cid, cid[1:])
        else:
            raise CIDError(f"not a CID: {cid!r} (expected base32 'b…', base58btc 'z…' or CIDv0 'Qm…')")
        version, pos = _read_varint(cid, raw, 0)
        if version != 1:
            raise CIDError(f"not a CID: {cid!r} has CID version {version}")
        codec, pos = _read_varint(cid, raw, pos)
        multihash = raw[pos:]
    if codec not in _CODEC_NAMES:
        raise CIDError(f"unsupported codec 0x{codec:x} in CID {cid!r} (expected raw or dag-pb)")
    hash_code, pos = _read_varint(cid, multihash, 0)
    size, pos = _read_varint(cid, multihash, pos)
    if hash_code != _SHA2_256 or size != _DIGEST_SIZE:
        raise CIDError(f"unsupported multihash 0x{hash_code:x}/{size} bytes in CID {cid!r} (expected sha2-256)")
    if len(multihash) - pos != _DIGEST_SIZE:
        raise CIDError(f"not a CID: {cid!r} has a {len(multihash) - pos}-byte digest, header says 32")
    return codec, multihash[pos:]


def cid_digest(cid: str) -> bytes:
    """The 32-byte sha2-256 digest inside ``cid`` (what goes on-chain as bytes32)."""
    return _parse(cid)[1]


def cid_codec(cid: str) -> str:
    """``"raw"`` or ``"dag-pb"``: the codec of ``cid``."""
    return _CODEC_NAMES[_parse(cid)[0]]


def normalize_cid(cid: str) -> str:
    """``cid`` as a base32 CIDv1; accepts base32 or base58btc CIDv1 and CIDv0 (which becomes dag-pb v1)."""
    return _to_base32(_cid_bytes(*_parse(cid)))


def cid_from_digest(digest: bytes, codec: str) -> str:
    """The base32 CIDv1 of a sha2-256 ``digest`` with ``codec`` ``"raw"`` or ``"dag-pb"``."""
    if codec not in CODECS:
        raise CIDError(f"unsupported codec {codec!r} (expected 'raw' or 'dag-pb')")
    if not isinstance(digest, bytes) or len(digest) != _DIGEST_SIZE:
        raise CIDError(f"not a sha2-256 digest: expected 32 bytes, got {digest!r:.80}")
    return _to_base32(_cid_bytes(CODECS[codec], digest))
