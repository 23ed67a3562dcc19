"""IpfsHttpStore against a real local IPFS daemon (js-ipfs from node_modules, or Kubo on PATH)."""
import os
import random
import time

import pytest
from support import free_port, require

from devstack import ipfs as ipfs_daemon
from devstack.daemon import post_json
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


def _api(node, command: str) -> dict:
    answer = post_json(f"{node.api_url}/api/v0/{command}", b"", 10)
    assert answer is not None, f"{command} did not answer on {node.api_url}"
    return answer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two networked IPFS daemons (own repos, API and swarm ports on 127.0.0.1), not yet connected."""
    require(ipfs_daemon.ipfs_command, ipfs_daemon.IpfsDaemonError, "IPFS node")
    base = tmp_path_factory.mktemp("ipfs-pair")
    nodes = [ipfs_daemon.start(base / name, api_port=free_port(), swarm_port=free_port()) for name in "ab"]
    yield nodes
    for node in nodes:
        ipfs_daemon.stop(node.state_dir)


def test_content_added_on_one_node_is_fetched_by_another_over_the_swarm(pair):
    """B gets A's file only once the two are connected, block by block over bitswap: each node is asked only
    through its own API."""
    a, b = pair
    assert a.swarm.rsplit("/", 1)[1] != b.swarm.rsplit("/", 1)[1] and a.api_url != b.api_url
    data = payload(5 * KIB * KIB + 7)  # 21 raw leaves under one dag-pb root
    cid = IpfsHttpStore(a.api_url).put(data)
    with pytest.raises(StorageError, match="timed out after 2s$"):  # no peer: nobody answers B's want
        IpfsHttpStore(b.api_url, timeout_s=2).get(cid)

    ipfs_daemon.connect(b.api_url, [a.swarm])
    assert a.swarm.rsplit("/", 1)[1] in ipfs_daemon.swarm_peers(b.api_url)
    assert b.swarm.rsplit("/", 1)[1] in ipfs_daemon.swarm_peers(a.api_url)
    received, sent = int(_api(b, "bitswap/stat")["BlocksReceived"]), int(_api(a, "bitswap/stat")["BlocksSent"])
    store_b = IpfsHttpStore(b.api_url, timeout_s=30)
    assert store_b.get(cid) == data
    deadline = time.monotonic() + 10  # js-ipfs updates its bitswap counters about once a second
    while (int(_api(b, "bitswap/stat")["BlocksReceived"]) - received < 22
           or int(_api(a, "bitswap/stat")["BlocksSent"]) - sent < 22):
        assert time.monotonic() < deadline, (_api(a, "bitswap/stat"), _api(b, "bitswap/stat"))
        time.sleep(0.2)
    assert not store_b.has(cid)  # fetched, not pinned: B only caches it


def test_a_restarted_node_redials_its_peers(pair):
    a, b = pair
    ipfs_daemon.stop(b.state_dir)
    port = int(b.api_url.rsplit(":", 1)[1])
    swarm_port = int(b.swarm.split("/tcp/")[1].split("/")[0])
    again = ipfs_daemon.start(b.state_dir, api_port=port, swarm_port=swarm_port, peers=[a.swarm])
    assert again.swarm == b.swarm  # same repo, same peer ID
    deadline = time.monotonic() + 30
    while a.swarm.rsplit("/", 1)[1] not in ipfs_daemon.swarm_peers(b.api_url):
        assert time.monotonic() < deadline, "the restarted node did not dial its bootstrap peer"
        time.sleep(0.2)
    data = payload(300 * KIB + 3)
    assert IpfsHttpStore(b.api_url, timeout_s=30).get(IpfsHttpStore(a.api_url).put(data)) == data


def test_connect_to_a_peer_that_is_not_there_fails_in_one_line(pair, tmp_path):
    a, _ = pair
    ghost = ipfs_daemon.init(tmp_path)  # a real peer ID whose daemon never runs
    with pytest.raises(ipfs_daemon.IpfsDaemonError, match=f"could not connect to {ghost} within 2 s$"):
        ipfs_daemon.connect(a.api_url, [f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{ghost}"], timeout=2)
