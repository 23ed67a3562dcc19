"""IpfsHttpStore against a real local IPFS daemon (js-ipfs from node_modules, or Kubo on PATH)."""
import os
import random

import pytest
from support import free_port, require

from devstack import ipfs as ipfs_daemon
from fednode.storage import IpfsHttpStore, StorageError
from fednode.storage.cid import cid_of

KIB = 1024
SIZES = [0, KIB, 300 * KIB, 5 * KIB * KIB]  # empty raw leaf, one raw leaf, 2-leaf and 20-leaf dag-pb files


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def _group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A real IPFS daemon for this module (skipped if none is installed, except under CI=true)."""
    require(ipfs_daemon.ipfs_command, ipfs_daemon.IpfsDaemonError, "IPFS node")
    state_dir = tmp_path_factory.mktemp("ipfs")
    handle = ipfs_daemon.start(state_dir, api_port=free_port())
    yield handle
    ipfs_daemon.stop(state_dir)


@pytest.fixture
def store(node):
    return IpfsHttpStore(node.api_url, timeout_s=30)


@pytest.mark.parametrize("size", SIZES)
def test_node_names_content_like_cid_of(store, size):
    data = payload(size)
    assert store.put(data) == cid_of(data)  # put also raises on a mismatch
    assert store.get(cid_of(data)) == data


def test_put_get_pin_has_round_trip(node, store):
    data = b"adapter for round 7"
    assert not store.has(cid_of(data))
    cid = store.put(data)
    assert store.has(cid)  # add pins
    store.pin(cid)
    assert store.has(cid)
    assert IpfsHttpStore(node.multiaddr).get(cid) == data


def test_get_of_content_not_on_the_node_times_out(node):
    cid = cid_of(b"no node holds this")
    store = IpfsHttpStore(node.api_url, timeout_s=2)
    assert not store.has(cid)
    with pytest.raises(StorageError, match=f"CID {cid} not available from IPFS at .*: timed out after 2s$"):
        store.get(cid)


def test_start_refuses_a_port_that_already_answers(node, tmp_path):
    port = node.api_url.rsplit(":", 1)[1]
    with pytest.raises(ipfs_daemon.IpfsDaemonError, match=f"already answers the IPFS API at .*:{port}"):
        ipfs_daemon.start(tmp_path, api_port=int(port))
    assert not (tmp_path / "ipfs.pid").exists()


def test_ipfs_command_without_an_implementation(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ipfs_daemon.IpfsDaemonError, match="run `npm ci`"):
        ipfs_daemon.ipfs_command(tmp_path)


def test_restart_keeps_data_and_stop_leaves_no_process(node, store):
    data = payload(300 * KIB + 1)
    cid = store.put(data)
    assert ipfs_daemon.stop(node.state_dir)
    assert _group_gone(node.pid)
    assert not ipfs_daemon.api_ready(node.api_url)
    assert not node.pid_file.exists()
    assert not ipfs_daemon.stop(node.state_dir)

    port = int(node.api_url.rsplit(":", 1)[1])
    again = ipfs_daemon.start(node.state_dir, api_port=port)
    assert again.pid != node.pid
    assert store.has(cid)
    assert store.get(cid) == data
