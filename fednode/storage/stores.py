"""Content-addressed storage: a local directory store, or a real IPFS node over its HTTP RPC API.

Both backends name content by the base32 CIDv1 that ``ipfs add --cid-version=1 --raw-leaves``
gives it (see :mod:`fednode.storage.cid`), so a CID written on-chain resolves the same way on either.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import ipfshttpclient
import requests
import urllib3

from chain.outage import DEFAULT_OUTAGE_SECONDS, Outage, OutageError

from .cid import CHUNK_SIZE, CIDError, cid_of, normalize_cid
from .files import write_atomic

T = TypeVar("T")

# ipfshttpclient 0.7.0 passes urllib3 a parameter that urllib3 2.x only warns about.
warnings.filterwarnings("ignore", message="The 'strict' parameter is no longer needed", category=FutureWarning)


class StorageError(RuntimeError):
    """Content that cannot be stored or fetched, or a store that cannot be reached."""


class StorageTooLarge(StorageError):
    """Content over the caller's size limit (nothing past the limit was read)."""


class StorageUnreachable(StorageError):
    """The store did not answer for its whole outage budget."""


class Storage(Protocol):
    def put(self, data: bytes) -> str:
        """Store ``data``; return its base32 CIDv1."""

    def get(self, cid: str, max_bytes: int | None = None) -> bytes:
        """The bytes stored under ``cid``; StorageError if missing, unreachable or over ``max_bytes``."""

    def pin(self, cid: str) -> None:
        """Keep ``cid`` stored for good."""

    def has(self, cid: str) -> bool:
        """Whether this store holds ``cid``."""


class EmbeddedStore:
    """A directory of files named by CID (``objects/``) plus empty pin markers (``pins/``).

    ``get`` returns the file as it lies on disk, without re-hashing it: checking content against
    its CID is the reader's job (the aggregator's), which tests exercise by editing ``path_of(cid)``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._objects = self.root / "objects"
        self._pins = self.root / "pins"
        try:
            self._objects.mkdir(parents=True, exist_ok=True)
            self._pins.mkdir(exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create embedded store at {self.root}: {e.strerror}") from e

    def path_of(self, cid: str) -> Path:
        """The file that holds ``cid`` (whether or not it exists)."""
        return self._objects / normalize_cid(cid)

    def put(self, data: bytes) -> str:
        cid = cid_of(data)
        try:
            write_atomic(self.path_of(cid), data)
        except OSError as e:
            raise StorageError(f"cannot store CID {cid} in embedded store {self.root}: {e.strerror}") from e
        return cid

    def get(self, cid: str, max_bytes: int | None = None) -> bytes:
        path = self.path_of(cid)
        try:
            with path.open("rb") as f:
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except FileNotFoundError:
            raise StorageError(f"CID {cid} not found in embedded store {self.root}") from None
        except OSError as e:
            raise StorageError(f"cannot read CID {cid} from {path}: {e.strerror}") from e
        if max_bytes is not None and len(data) > max_bytes:
            raise StorageTooLarge(f"CID {cid} in embedded store {self.root} is over the {max_bytes}-byte limit")
        return data

    def pin(self, cid: str) -> None:
        if not self.has(cid):
            raise StorageError(f"cannot pin CID {cid}: not in embedded store {self.root}")
        (self._pins / normalize_cid(cid)).touch()

    def has(self, cid: str) -> bool:
        return self.path_of(cid).is_file()

    def is_pinned(self, cid: str) -> bool:
        return (self._pins / normalize_cid(cid)).is_file()


def _multiaddr(address: str) -> str:
    """``address`` as an API multiaddr; URLs like ``http://127.0.0.1:5001`` are converted (port 5001 if absent)."""
    if address.startswith("/"):
        return address
    url = urllib.parse.urlsplit(address)
    try:
        port = url.port or 5001
    except ValueError:
        port = None
    if url.scheme not in ("http", "https") or not url.hostname or port is None:
        raise StorageError(
            f"bad IPFS API address {address!r}: expected e.g. /ip4/127.0.0.1/tcp/5001/http or http://127.0.0.1:5001"
        )
    try:
        proto = f"ip{ipaddress.ip_address(url.hostname).version}"
    except ValueError:
        proto = "dns"
    return f"/{proto}/{url.hostname}/tcp/{port}/{url.scheme}"


def _is_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a timeout; a body read that stalls surfaces as requests' ConnectionError."""
    if isinstance(error, (ipfshttpclient.exceptions.TimeoutError, requests.Timeout)):
        return True
    return any(isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in error.args)


class IpfsHttpStore:
    """An IPFS node (Kubo, or js-ipfs, which answers as 0.18.1) reached over its HTTP RPC API.

    Uses only add, cat, pin/add, pin/ls and version, which both implement. ``put`` adds with
    CIDv1 raw leaves and the default 262144-byte chunker (add also pins), and checks the node's
    CID against :func:`cid_of`. Every call gives up after ``timeout_s`` without a byte from the
    node: a cat of content no peer has would otherwise hang forever.
    """

    def __init__(self, address: str, timeout_s: float = 30.0, outage_s: float = DEFAULT_OUTAGE_SECONDS) -> None:
        self.address = address
        self.multiaddr = _multiaddr(address)
        self.timeout_s = timeout_s
        self.outage = Outage(f"IPFS API {address}", budget_s=outage_s)
        try:
            self._client = ipfshttpclient.Client(self.multiaddr, timeout=timeout_s)
        except ipfshttpclient.exceptions.AddressError as e:
            raise StorageError(f"bad IPFS API address {address!r}: {e}") from e

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` against the node, riding out an unreachable node (``chain.outage``), with the client's
        exceptions turned into one-line StorageErrors that start with ``what``."""
        try:
            return self.outage.call(fn, _unreachable)
        except OutageError as e:
            retried = f" (retried for {self.outage.budget_s:g} s)" if self.outage.budget_s else ""
            raise StorageUnreachable(f"{what}: {e.reason}{retried}") from None
        except (ipfshttpclient.exceptions.Error, requests.RequestException) as e:
            if _is_timeout(e):
                raise StorageError(f"{what}: timed out after {self.timeout_s:g}s") from e
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StorageError(f"{what}: {reason}") from e

    def version(self) -> str:
        """The node's version string (js-ipfs 0.66 says 0.18.1)."""
        return str(self._call(f"cannot query the version of IPFS at {self.address}",
                              lambda: self._client.version()["Version"]))

    def put(self, data: bytes) -> str:
        expected = cid_of(data)
        opts = {"cid-version": 1, "raw-leaves": "true", "chunker": f"size-{CHUNK_SIZE}"}
        returned = self._call(f"cannot add {len(data)} bytes to IPFS at {self.address}",
                              lambda: self._client.add_bytes(data, opts=opts))
        try:
            cid = normalize_cid(returned)
        except CIDError as e:
            raise StorageError(f"IPFS at {self.address} answered add with {e}") from e
        if cid != expected:
            raise StorageError(
                f"IPFS at {self.address} named {len(data)} bytes {cid}, expected {expected}: "
                "its add settings differ from Kubo's defaults"
            )
        return cid

    def get(self, cid: str, max_bytes: int | None = None) -> bytes:
        cid = normalize_cid(cid)
        length = None if max_bytes is None else max_bytes + 1
        data = self._call(f"CID {cid} not available from IPFS at {self.address}",
                          lambda: self._client.cat(cid, length=length))
        if max_bytes is not None and len(data) > max_bytes:
            raise StorageTooLarge(f"CID {cid} on IPFS at {self.address} is over the {max_bytes}-byte limit")
        return data

    def pin(self, cid: str) -> None:
        cid = normalize_cid(cid)
        self._call(f"cannot pin CID {cid} on IPFS at {self.address}", lambda: self._client.pin.add(cid))

    def has(self, cid: str) -> bool:
        """Whether the node holds ``cid`` pinned (directly, recursively or inside a pinned DAG)."""
        cid = normalize_cid(cid)
        try:
            self._call(f"cannot list pins of CID {cid} on IPFS at {self.address}",
                       lambda: self._client.pin.ls(cid, type="all"))
        except StorageUnreachable:
            raise
        except StorageError as e:
            if "is not pinned" in str(e):
                return False
            raise
        return True


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` means the node did not answer at all (refused or dropped), not a slow or missing CID."""
    return isinstance(error, (ipfshttpclient.exceptions.ConnectionError, requests.ConnectionError)) \
        and not _is_timeout(error)


def open_storage(spec: str, root_default: Path | None = None, timeout_s: float = 30.0,
                 outage_s: float = DEFAULT_OUTAGE_SECONDS) -> Storage:
    """The store ``spec`` names: ``embedded`` (at ``root_default``), ``embedded:PATH``, ``ipfs:ADDRESS`` or a bare
    IPFS API address (``http://host:5001``, ``/ip4/.../tcp/5001/http``)."""
    if spec.startswith(("http://", "https://", "/")):
        spec = f"ipfs:{spec}"
    kind, _, arg = spec.partition(":")
    if kind == "embedded" and (arg or root_default is not None):
        return EmbeddedStore(Path(arg) if arg else root_default)
    if kind == "ipfs" and arg:
        return IpfsHttpStore(arg, timeout_s=timeout_s, outage_s=outage_s)
    raise StorageError(f"unknown storage {spec!r}: expected 'embedded:PATH', an IPFS API address "
                       "(http://127.0.0.1:5001) or 'ipfs:ADDRESS'")
