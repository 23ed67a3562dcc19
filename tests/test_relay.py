"""The relay path outside the contract: the aggregator's relayer leaves out signed updates the contract would refuse
(so a forger cannot sink an honest batch), the HTTP endpoint takes only CIDs, and config mistakes are one line."""
from __future__ import annotations

from dataclasses import replace

import pytest
from eth_account import Account
from support import free_port

from chain.signing import UpdateFields, sign_update
from fednode.ops.cli import main
from fednode.ops.relay_http import RelayError, relay_client, serve_relay
from fednode.protocol.ledger import Ledger
from fednode.protocol.publish import publish_json
from fednode.protocol.relay import Relayer, hand_over
from fednode.storage import EmbeddedStore


def fields(fed, node, round_id: int, tag: str = "") -> UpdateFields:
    return UpdateFields(round_id, fed.digest(f"cid{tag} {node.address}"), fed.digest(f"sha{tag} {node.address}"), 10,
                        fed.digest(f"m{tag} {node.address}"))


def test_the_relayer_leaves_out_what_the_contract_would_refuse(embedded_fed, tmp_path):
    fed = embedded_fed
    honest, revoked = fed.approved_nodes(2)
    store = EmbeddedStore(tmp_path / "store")
    round_id = fed.open_round()
    logged = []
    relayer = Relayer(fed.aggregator, store, log=logged.append)
    hand_over(honest, store, fields(fed, honest, round_id), relayer.receive)
    stranger = Account.create()
    forged = replace(sign_update(stranger, fed.deployment.chain_id, fed.deployment.address("Federation"),
                                 fields(fed, honest, round_id, " forged")), node=honest.address)
    relayer.receive(publish_json(store, forged.to_json())[0])  # a second update naming the honest node, forged
    old = sign_update(revoked.sender.account, fed.deployment.chain_id, fed.deployment.address("Federation"),
                      fields(fed, revoked, round_id + 1))
    relayer.receive(publish_json(store, old.to_json())[0])  # signed for another round
    hand_over(revoked, store, fields(fed, revoked, round_id), relayer.receive)
    fed.admin.revoke(revoked.address)
    relayer.receive(publish_json(store, {"not": "a signed update"})[0])
    history = Ledger(fed.admin).refresh()
    receipt = relayer.flush(history, history.rounds[round_id])
    assert receipt is not None
    [sub] = Ledger(fed.admin).refresh().rounds[round_id].submissions
    assert sub.node == honest.address and sub.cid_digest == fed.digest(f"cid {honest.address}")
    left_out = [m for m in logged if "left out" in m]
    assert len(left_out) == 4
    assert any(f"the signature is not {honest.address}'s" in m for m in left_out)
    assert any(f"signed for round {round_id + 1}" in m for m in left_out)
    assert any(f"{revoked.address} is not an approved participant" in m for m in left_out)
    assert any("unreadable" in m for m in left_out)
    assert relayer.flush(history, history.rounds[round_id]) is None  # the inbox is empty now


def test_the_relay_endpoint_takes_cids_only():
    received = []
    listen = f"127.0.0.1:{free_port()}"
    server = serve_relay(listen, received.append)
    try:
        hand = relay_client(f"http://{listen}")
        cid = "bafkreiely3rv2s7t365sb7ngqyf73p6zl42umhn5lwdwarxrvfq767mqsi"
        hand(cid)
        assert received == [cid]
        with pytest.raises(RelayError, match="refused the signed update: not a CID"):
            hand("../../etc/passwd")
        assert received == [cid]
    finally:
        server.shutdown()
    with pytest.raises(RelayError, match=f"relay http://{listen} unreachable"):
        relay_client(f"http://{listen}", timeout=2)(cid)


@pytest.mark.parametrize("section, text, message", [
    ("node", 'submit = "carrier pigeon"', '[node] submit must be "direct" or "relay", got \'carrier pigeon\''),
    ("node", 'relay = "127.0.0.1:8547"', "[node] relay must be an http(s) URL"),
    ("aggregator", 'relay_listen = "8547"', '[aggregator] relay_listen must be "host:port"'),
])
def test_a_bad_relay_setting_is_one_line(tmp_path, capsys, section, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(f"[{section}]\n{text}\n")
    assert main(["node", "run", "--config", str(path)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
