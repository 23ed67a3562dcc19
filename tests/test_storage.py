import os
import socket

import pytest
from support import free_port

from fednode.storage import EmbeddedStore, IpfsHttpStore, StorageError, open_storage
from fednode.storage.cid import CHUNK_SIZE, cid_of

DATA = b"adapter bytes " * 1000
BIG = bytes(range(256)) * (3 * CHUNK_SIZE // 256 + 1)  # a multi-chunk (dag-pb) file


@pytest.fixture
def store(tmp_path):
    return EmbeddedStore(tmp_path / "store")


def test_put_get_round_trip(store):
    for data in (b"", DATA, BIG):
        cid = store.put(data)
        assert cid == cid_of(data)
        assert store.has(cid)
        assert store.get(cid) == data


def test_put_is_idempotent_and_leaves_no_temporary_files(store):
    assert store.put(DATA) == store.put(DATA)
    assert os.listdir(store.path_of(cid_of(DATA)).parent) == [cid_of(DATA)]


def test_failed_write_leaves_nothing_behind(store, monkeypatch):
    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StorageError, match=cid_of(DATA)):
        store.put(DATA)
    assert os.listdir(store.path_of(cid_of(DATA)).parent) == []
    assert not store.has(cid_of(DATA))


def test_any_cid_spelling_finds_the_same_object(store):
    cid = store.put(BIG)
    v0 = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
    assert store.path_of(v0) == store.path_of("bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354")
    assert store.get(cid.upper()) == BIG


def test_get_missing_cid(store):
    cid = cid_of(b"never stored")
    with pytest.raises(StorageError, match=f"CID {cid} not found"):
        store.get(cid)
    assert not store.has(cid)


def test_get_respects_max_bytes(store):
    cid = store.put(DATA)
    assert store.get(cid, max_bytes=len(DATA)) == DATA
    with pytest.raises(StorageError, match=f"{cid} .*over the {len(DATA) - 1}-byte limit"):
        store.get(cid, max_bytes=len(DATA) - 1)


def test_get_returns_bytes_as_stored_without_verifying(store):
    cid = store.put(DATA)
    store.path_of(cid).write_bytes(b"tampered")
    assert store.get(cid) == b"tampered"


def test_pin(store):
    cid = store.put(DATA)
    assert not store.is_pinned(cid)
    store.pin(cid)
    store.pin(cid)
    assert store.is_pinned(cid)
    assert EmbeddedStore(store.root).is_pinned(cid)  # recorded on disk


def test_pin_missing_cid(store):
    cid = cid_of(b"never stored")
    with pytest.raises(StorageError, match=f"cannot pin CID {cid}"):
        store.pin(cid)


def test_open_storage(tmp_path):
    assert open_storage("embedded", tmp_path / "a").root == tmp_path / "a"
    assert open_storage(f"embedded:{tmp_path / 'b'}", tmp_path / "a").root == tmp_path / "b"
    ipfs = open_storage("ipfs:http://127.0.0.1:5001", tmp_path)
    assert isinstance(ipfs, IpfsHttpStore)
    assert ipfs.multiaddr == "/ip4/127.0.0.1/tcp/5001/http"
    for spec in ("s3:bucket", "ipfs:", "", "embeddedx"):
        with pytest.raises(StorageError, match="unknown storage"):
            open_storage(spec, tmp_path)


@pytest.mark.parametrize(
    "address, multiaddr",
    [
        ("/ip4/127.0.0.1/tcp/5001/http", "/ip4/127.0.0.1/tcp/5001/http"),
        ("http://127.0.0.1:5002", "/ip4/127.0.0.1/tcp/5002/http"),
        ("http://localhost", "/dns/localhost/tcp/5001/http"),
        ("https://[::1]:443", "/ip6/::1/tcp/443/https"),
    ],
)
def test_ipfs_address_forms(address, multiaddr):
    assert IpfsHttpStore(address).multiaddr == multiaddr


@pytest.mark.parametrize("address", ["ftp://host:21", "127.0.0.1:5001", "http://host:port", "/ip4/1.2.3.4/udp/5001"])
def test_bad_ipfs_address(address):
    with pytest.raises(StorageError, match="bad IPFS API address"):
        IpfsHttpStore(address)


OPERATIONS = {
    "put": lambda s: s.put(DATA),
    "get": lambda s: s.get(cid_of(DATA)),
    "pin": lambda s: s.pin(cid_of(DATA)),
    "has": lambda s: s.has(cid_of(DATA)),
    "version": lambda s: s.version(),
}


@pytest.mark.parametrize("operation", OPERATIONS.values(), ids=OPERATIONS.keys())
def test_ipfs_connection_refused_names_the_address(operation):
    address = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match=f"IPFS .*at {address}: connection refused$"):
        operation(IpfsHttpStore(address, timeout_s=5, outage_s=0))


@pytest.mark.parametrize("operation", [OPERATIONS["get"], OPERATIONS["put"]], ids=["get", "put"])
def test_ipfs_silent_node_times_out(operation):
    """A node that accepts the connection but never answers (as a cat of unfindable content does)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}/http"
        with pytest.raises(StorageError, match=f"at {address}: timed out after 0.5s$"):
            operation(IpfsHttpStore(address, timeout_s=0.5))
