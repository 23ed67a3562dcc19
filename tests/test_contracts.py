"""The Federation contract on the embedded chain: every external function's success path (events and stored
state), every custom error in its ABI, the verdict counting, revocation, and several transactions in flight."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
from eth_abi import encode
from eth_account import Account
from web3 import Web3

from chain.commitments import submission_commitment
from chain.clients import Participant, RoundInfo, RoundState, Status
from chain.compiler import load_artifact
from chain.connection import advance_time
from chain.deployment import ADMIN_DELAY_S, AGGREGATOR_ROLE, deploy
from chain.errors import ChainError
from chain.signing import UpdateFields, sign_update

ADMIN_ROLE = b"\0" * 32
ZERO = b"\0" * 32
HOUR = 3600
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def event_args(client, receipt, name: str) -> dict:
    """The arguments of the single `name` event in a receipt."""
    logs = getattr(client.contract.events, name)().process_receipt(receipt.raw)
    assert len(logs) == 1, f"expected one {name} event, got {len(logs)}"
    return dict(logs[0]["args"])


def submit(fed, node, round_id: int, samples: int = 100, tag: str = ""):
    return node.submit_update(round_id, fed.digest(f"cid{tag} {node.address}"), fed.digest(f"sha{tag} {node.address}"),
                              samples, fed.digest(f"metrics{tag} {node.address}"))


def finalize(fed, round_id: int, verdicts: bytes, client=None):
    client = client or fed.aggregator
    return client.finalize(round_id, fed.digest(f"global {round_id}"), fed.digest(f"global sha {round_id}"), verdicts)


# Success paths ---------------------------------------------------------------------------------------------------

def test_deployment_grants_admin_and_aggregator_roles(embedded_fed):
    fed = embedded_fed
    has_role = fed.admin.contract.functions.hasRole
    assert has_role(ADMIN_ROLE, fed.admin.address).call()
    assert has_role(AGGREGATOR_ROLE, fed.aggregator.address).call()
    assert not has_role(AGGREGATOR_ROLE, fed.admin.address).call()
    assert not has_role(ADMIN_ROLE, fed.aggregator.address).call()
    assert fed.admin.round_count() == 0
    granted = [(e.args["role"], e.args["account"], e.args["sender"]) for e in fed.admin.events()]
    assert granted == [(ADMIN_ROLE, fed.admin.address, fed.admin.address),
                       (bytes(AGGREGATOR_ROLE), fed.aggregator.address, fed.admin.address)]


def test_join_records_a_pending_participant(embedded_fed):
    fed = embedded_fed
    node = fed.client(1)
    receipt = node.join(fed.digest("model"), fed.digest("card"))
    assert event_args(node, receipt, "Joined") == {
        "node": node.address, "modelId": fed.digest("model"), "metadataDigest": fed.digest("card")}
    p = node.participant(node.address)
    assert (p.model_id, p.metadata_digest, p.status) == (fed.digest("model"), fed.digest("card"), Status.PENDING)
    assert (p.joined_block, p.approved_block, p.revoked_block) == (receipt.block_number, 0, 0)


def test_approve_makes_a_pending_node_a_participant(embedded_fed):
    fed = embedded_fed
    [node] = fed.joined_nodes([1])
    receipt = fed.admin.approve(node.address)
    assert event_args(fed.admin, receipt, "Approved") == {"node": node.address, "admin": fed.admin.address}
    p = fed.admin.participant(node.address)
    assert p.status == Status.APPROVED
    assert 0 < p.joined_block < p.approved_block == receipt.block_number


@pytest.mark.parametrize("approved", [True, False], ids=["approved", "pending"])
def test_revoke_keeps_the_record_and_reason(embedded_fed, approved):
    fed = embedded_fed
    [node] = fed.approved_nodes(1) if approved else fed.joined_nodes([1])
    receipt = fed.admin.revoke(node.address, reason=2)
    assert event_args(fed.admin, receipt, "Revoked") == {"node": node.address, "admin": fed.admin.address,
                                                         "reason": 2}
    p = fed.admin.participant(node.address)
    assert p.status == Status.REVOKED
    assert p.model_id == fed.digest("model 1")
    assert p.revoked_block == receipt.block_number
    assert (p.approved_block > 0) == approved


def test_admin_grants_the_aggregator_role(embedded_fed):
    fed = embedded_fed
    new_aggregator = fed.client(1)
    receipt = fed.admin.grant_aggregator(new_aggregator.address)
    assert event_args(fed.admin, receipt, "RoleGranted") == {
        "role": bytes(AGGREGATOR_ROLE), "account": new_aggregator.address, "sender": fed.admin.address}
    assert fed.admin.contract.functions.hasRole(AGGREGATOR_ROLE, new_aggregator.address).call()
    [node] = fed.approved_nodes(1, first=2)
    round_id = fed.open_round()
    submit(fed, node, round_id)
    assert finalize(fed, round_id, b"\0", client=new_aggregator).gas_used > 0


@pytest.mark.parametrize("opener", ["aggregator", "admin"])
def test_configure_registers_the_initial_adapter_and_rules(embedded_fed, opener):
    fed = embedded_fed
    client = getattr(fed, opener)
    receipt = client.configure(fed.digest("cid"), fed.digest("sha"), fed.digest("rules"))
    assert event_args(client, receipt, "Configured") == {
        "by": client.address, "cidDigest": fed.digest("cid"), "fileSha256": fed.digest("sha"),
        "rulesDigest": fed.digest("rules")}
    assert client.lineage_head() == (fed.digest("cid"), fed.digest("sha"))
    assert client.rules_digest() == fed.digest("rules")


@pytest.mark.parametrize("opener", ["aggregator", "admin"])
def test_open_round_stores_and_announces_the_round(embedded_fed, opener):
    fed = embedded_fed
    client = getattr(fed, opener)
    client.configure(fed.digest("cid"), fed.digest("sha"), fed.digest("rules"))
    deadline = client.chain_time() + HOUR
    round_id, receipt = client.open_round(fed.digest("cid"), fed.digest("sha"), fed.digest("rules"), deadline, 3,
                                          allow_below_quorum=False)
    assert round_id == 1 == client.round_count()
    assert event_args(client, receipt, "RoundOpened") == {
        "roundId": 1, "opener": client.address, "baseCidDigest": fed.digest("cid"), "baseSha256": fed.digest("sha"),
        "rulesDigest": fed.digest("rules"), "deadline": deadline, "minUpdates": 3, "allowBelowQuorum": False}
    assert client.round(1) == RoundInfo(1, deadline, 3, 0, 0, RoundState.OPEN, False)


def test_finalize_moves_the_lineage_head_and_cancel_keeps_it(embedded_fed):
    fed = embedded_fed
    [node] = fed.approved_nodes(1)
    first = fed.open_round()
    submit(fed, node, first)
    finalize(fed, first, b"\0")
    head = (fed.digest(f"global {first}"), fed.digest(f"global sha {first}"))
    assert fed.admin.lineage_head() == head
    second = fed.open_round()
    [opened] = [e.args for e in fed.admin.events() if e.name == "RoundOpened" and e.args["roundId"] == second]
    assert (opened["baseCidDigest"], opened["baseSha256"]) == head
    advance_time(fed.w3, HOUR + 1)
    fed.aggregator.cancel_round(second)
    assert fed.admin.lineage_head() == head


def test_only_an_admin_changes_the_rules_and_says_so(embedded_fed):
    fed = embedded_fed
    fed.configure()
    receipt = fed.admin.change_rules(fed.digest("rules v2"))
    assert event_args(fed.admin, receipt, "RulesChanged") == {
        "admin": fed.admin.address, "previousDigest": fed.digest("rules"), "rulesDigest": fed.digest("rules v2")}
    assert fed.admin.rules_digest() == fed.digest("rules v2")
    with pytest.raises(ChainError) as info:
        fed.aggregator.change_rules(fed.digest("rules v3"))
    assert info.value.error_name == "AccessControlUnauthorizedAccount"
    assert fed.open_round() == 1


def test_the_admin_role_moves_in_two_steps_after_the_delay(embedded_fed):
    fed = embedded_fed
    successor = fed.client(1)
    fed.admin.begin_admin_transfer(successor.address)
    assert fed.admin.admin() == fed.admin.address
    advance_time(fed.w3, ADMIN_DELAY_S + 1)
    successor.accept_admin_transfer()
    assert fed.admin.admin() == successor.address
    [node] = fed.joined_nodes([2])
    with pytest.raises(ChainError):
        fed.admin.approve(node.address)
    successor.approve(node.address)


def test_a_relayed_batch_records_what_direct_submissions_record(embedded_fed):
    """Nodes sign (no transaction, no ether spent); the aggregator relays their updates in one transaction, after a direct one:
    same events, same commitments, indices continuing."""
    fed = embedded_fed
    direct, *relayed = fed.approved_nodes(4)
    round_id = fed.open_round()
    before = [(fed.w3.eth.get_balance(n.address), fed.w3.eth.get_transaction_count(n.address)) for n in relayed]
    submit(fed, direct, round_id)
    updates = [signed(fed, n, round_id) for n in relayed]
    receipt = fed.aggregator.submit_signed_batch(round_id, updates)
    events = [dict(e["args"]) for e in fed.admin.contract.events.UpdateSubmitted().process_receipt(receipt.raw)]
    assert events == [{"roundId": round_id, "node": u.node, "index": i, "cidDigest": u.fields.cid_digest,
                       "fileSha256": u.fields.file_sha256, "numSamples": 100,
                       "metricsDigest": u.fields.metrics_digest} for i, u in enumerate(updates, start=1)]
    for i, u in enumerate(updates, start=1):
        f = u.fields
        assert fed.admin.submission_commitment(round_id, u.node) == submission_commitment(
            i, f.cid_digest, f.file_sha256, f.num_samples, f.metrics_digest)
    assert fed.admin.round(round_id).submissions == 4
    assert before == [(fed.w3.eth.get_balance(n.address), fed.w3.eth.get_transaction_count(n.address))
                      for n in relayed]  # the relayed nodes spent nothing and sent nothing
    assert fed.admin.contract.functions.updateDigest(round_id, *updates[0].as_call_arg()[1:5]).call() \
        == bytes(updates[0].digest())


def test_submit_update_records_a_commitment(embedded_fed):
    fed = embedded_fed
    first, second = fed.approved_nodes(2)
    round_id = fed.open_round()
    submit(fed, first, round_id)
    receipt = second.submit_update(round_id, fed.digest("cid"), fed.digest("sha"), 1234, fed.digest("metrics"))
    assert event_args(second, receipt, "UpdateSubmitted") == {
        "roundId": round_id, "node": second.address, "index": 1, "cidDigest": fed.digest("cid"),
        "fileSha256": fed.digest("sha"), "numSamples": 1234, "metricsDigest": fed.digest("metrics")}
    expected = Web3.keccak(encode(["uint32", "bytes32", "bytes32", "uint64", "bytes32"],
                                  [1, fed.digest("cid"), fed.digest("sha"), 1234, fed.digest("metrics")]))
    assert second.submission_commitment(round_id, second.address) == expected
    assert second.submission_commitment(round_id, fed.aggregator.address) == ZERO
    assert second.round(round_id).submissions == 2


def test_finalize_stores_the_result_and_verdicts(embedded_fed):
    fed = embedded_fed
    nodes = fed.approved_nodes(3)
    round_id = fed.open_round(min_updates=2)
    fed.submit_all(round_id, nodes)
    verdicts = bytes([0, 3, 0])
    receipt = finalize(fed, round_id, verdicts)
    cid, sha = fed.digest(f"global {round_id}"), fed.digest(f"global sha {round_id}")
    assert event_args(fed.aggregator, receipt, "RoundFinalized") == {
        "roundId": round_id, "aggregator": fed.aggregator.address, "cidDigest": cid, "fileSha256": sha,
        "accepted": 2, "verdicts": verdicts}
    info = fed.admin.round(round_id)
    assert (info.state, info.submissions, info.accepted) == (RoundState.FINALIZED, 3, 2)
    assert fed.admin.result_commitment(round_id) == Web3.keccak(
        encode(["bytes32", "bytes32", "bytes32"], [cid, sha, Web3.keccak(verdicts)]))


def test_finalize_below_quorum_after_the_deadline_when_allowed(embedded_fed):
    fed = embedded_fed
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round(min_updates=5, allow_below_quorum=True)
    submit(fed, node, round_id)
    advance_time(fed.w3, HOUR + 1)
    finalize(fed, round_id, b"\0")
    assert fed.admin.round(round_id).accepted == 1


def test_cancel_round_after_its_deadline_lets_the_next_round_open(embedded_fed):
    fed = embedded_fed
    round_id = fed.open_round()
    advance_time(fed.w3, HOUR + 1)
    receipt = fed.admin.cancel_round(round_id)
    assert event_args(fed.admin, receipt, "RoundCancelled") == {"roundId": round_id, "by": fed.admin.address}
    assert fed.admin.round(round_id).state == RoundState.CANCELLED
    assert fed.open_round() == round_id + 1


def test_views_of_unknown_entries_are_empty(embedded_fed):
    fed = embedded_fed
    stranger = fed.node_account(1).address
    assert fed.admin.participant(stranger) == Participant(stranger, ZERO, ZERO, Status.NONE, 0, 0, 0)
    assert fed.admin.round(7) == RoundInfo(7, 0, 0, 0, 0, RoundState.NONE, False)
    assert fed.admin.submission_commitment(7, stranger) == ZERO
    assert fed.admin.result_commitment(7) == ZERO


# Custom errors ---------------------------------------------------------------------------------------------------
# Each case sets up a chain state and returns the refused action and the fragments its message must contain.

CASES: dict[str, tuple] = {}


def case(error_name: str):
    def register(scenario):
        CASES[f"{error_name}-{scenario.__name__}"] = (error_name, scenario)
        return scenario
    return register


@case("ZeroModelId")
def zero_model_id(fed):
    node = fed.client(1)
    return lambda: node.join(ZERO, fed.digest("card")), []


@case("AlreadyJoined")
def join_twice(fed):
    [node] = fed.joined_nodes([1])
    return lambda: node.join(fed.digest("model"), fed.digest("card")), [node.address, "status Pending"]


@case("NotPending")
def approve_twice(fed):
    [node] = fed.approved_nodes(1)
    return lambda: fed.admin.approve(node.address), [node.address, "status Approved"]


@case("NotPending")
def approve_stranger(fed):
    stranger = fed.node_account(1).address
    return lambda: fed.admin.approve(stranger), [stranger, "status None"]


@case("NotApproved")
def revoke_twice(fed):
    [node] = fed.approved_nodes(1)
    fed.admin.revoke(node.address)
    return lambda: fed.admin.revoke(node.address), [node.address, "status Revoked"]


@case("NotApproved")
def revoke_stranger(fed):
    stranger = fed.node_account(1).address
    return lambda: fed.admin.revoke(stranger), [stranger, "status None"]


@case("NotCoordinator")
def node_opens_round(fed):
    [node] = fed.approved_nodes(1)
    return lambda: node.open_round(fed.digest("a"), fed.digest("b"), fed.digest("c"), node.chain_time() + HOUR, 1), \
        [node.address]


@case("NotAggregator")
def admin_finalizes(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    submit(fed, node, round_id)
    return lambda: finalize(fed, round_id, b"\0", client=fed.admin), [fed.admin.address]


@case("NotCoordinator")
def node_cancels_round(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    advance_time(fed.w3, HOUR + 1)
    return lambda: node.cancel_round(round_id), [node.address]


@case("NotParticipant")
def pending_node_submits(fed):
    [node] = fed.joined_nodes([1])
    round_id = fed.open_round()
    return lambda: submit(fed, node, round_id), [node.address, "status Pending"]


@case("NotParticipant")
def revoked_node_submits(fed):
    [node] = fed.approved_nodes(1)
    fed.admin.revoke(node.address)
    round_id = fed.open_round()
    return lambda: submit(fed, node, round_id), [node.address, "status Revoked"]


@case("NotParticipant")
def stranger_submits(fed):
    stranger = fed.client(1)
    round_id = fed.open_round()
    return lambda: submit(fed, stranger, round_id), [stranger.address, "status None"]


@case("UnknownRound")
def submit_to_unknown_round(fed):
    [node] = fed.approved_nodes(1)
    return lambda: submit(fed, node, 1), ["round 1 "]


@case("UnknownRound")
def finalize_unknown_round(fed):
    fed.open_round()
    return lambda: finalize(fed, 2, b""), ["round 2 "]


@case("UnknownRound")
def cancel_unknown_round(fed):
    return lambda: fed.aggregator.cancel_round(3), ["round 3 "]


@case("RoundNotOpen")
def finalize_twice(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    submit(fed, node, round_id)
    finalize(fed, round_id, b"\0")
    return lambda: finalize(fed, round_id, b"\0"), [f"round {round_id} ", "state Finalized"]


@case("RoundNotOpen")
def submit_to_finalized_round(fed):
    first, second = fed.approved_nodes(2)
    round_id = fed.open_round()
    submit(fed, first, round_id)
    finalize(fed, round_id, b"\0")
    return lambda: submit(fed, second, round_id), [f"round {round_id} ", "state Finalized"]


@case("RoundNotOpen")
def submit_to_cancelled_round(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    advance_time(fed.w3, HOUR + 1)
    fed.aggregator.cancel_round(round_id)
    return lambda: submit(fed, node, round_id), [f"round {round_id} ", "state Cancelled"]


@case("RoundNotOpen")
def cancel_cancelled_round(fed):
    round_id = fed.open_round()
    advance_time(fed.w3, HOUR + 1)
    fed.aggregator.cancel_round(round_id)
    return lambda: fed.aggregator.cancel_round(round_id), [f"round {round_id} ", "state Cancelled"]


@case("PreviousRoundOpen")
def open_while_open(fed):
    round_id = fed.open_round()
    return lambda: fed.open_round(), [f"round {round_id} "]


@case("InvalidDeadline")
def deadline_now(fed):
    fed.configure()
    now = fed.admin.chain_time()
    return lambda: fed.open_round(duration=0), [str(now)]


@case("InvalidQuorum")
def zero_quorum(fed):
    return lambda: fed.open_round(min_updates=0), []


@case("ZeroDigest")
def configure_zero_rules(fed):
    return lambda: fed.aggregator.configure(fed.digest("cid"), fed.digest("sha"), ZERO), []


@case("AlreadyConfigured")
def configure_twice(fed):
    fed.configure()
    return lambda: fed.admin.configure(fed.digest("other cid"), fed.digest("other sha"), fed.digest("rules")), []


@case("NotConfigured")
def open_before_configure(fed):
    agg = fed.aggregator
    return lambda: agg.open_round(fed.digest("cid"), fed.digest("sha"), fed.digest("rules"),
                                  agg.chain_time() + HOUR, 1), []


@case("NotConfigured")
def change_rules_before_configure(fed):
    return lambda: fed.admin.change_rules(fed.digest("rules")), []


@case("LineageBroken")
def open_from_another_adapter(fed):
    """A coordinator starts round 1 from an adapter of its choosing instead of the registered initial one."""
    fed.configure()
    agg = fed.aggregator
    return lambda: agg.open_round(fed.digest("mine"), fed.digest("initial sha"), fed.digest("rules"),
                                  agg.chain_time() + HOUR, 1), ["0x" + fed.digest("initial cid").hex()]


@case("LineageBroken")
def open_from_the_previous_start(fed):
    """After round 1 is finalized, round 2 is opened from round 1's start adapter, skipping its result."""
    [node] = fed.approved_nodes(1)
    first = fed.open_round()
    submit(fed, node, first)
    finalize(fed, first, b"\0")
    agg = fed.aggregator
    return lambda: agg.open_round(fed.digest("initial cid"), fed.digest("initial sha"), fed.digest("rules"),
                                  agg.chain_time() + HOUR, 1), ["0x" + fed.digest(f"global {first}").hex()]


@case("RulesMismatch")
def open_under_other_rules(fed):
    fed.configure()
    agg = fed.aggregator
    return lambda: agg.open_round(*agg.lineage_head(), fed.digest("laxer rules"), agg.chain_time() + HOUR, 1), \
        ["0x" + fed.digest("rules").hex()]


# Signed updates relayed by someone else: forged, replayed and malleated signatures ------------------------------

def signed(fed, node, round_id: int, tag: str = "", chain_id: int | None = None, federation: str | None = None):
    """`node`'s own EIP-712 signature of an update to `round_id` (for another chain or federation if given)."""
    fields = UpdateFields(round_id, fed.digest(f"cid{tag} {node.address}"), fed.digest(f"sha{tag} {node.address}"),
                          100, fed.digest(f"metrics{tag} {node.address}"))
    return sign_update(node.sender.account, chain_id or fed.deployment.chain_id,
                       federation or fed.deployment.address("Federation"), fields)


@case("WrongSigner")
def forged_signature(fed):
    """A stranger's wallet signs an update naming an approved node."""
    [node] = fed.approved_nodes(1)
    forger = fed.client(2)
    round_id = fed.open_round()
    forged = replace(signed(fed, forger, round_id), node=node.address)
    return lambda: fed.aggregator.submit_signed_batch(round_id, [forged]), [node.address, forger.address]


@case("WrongSigner")
def replayed_from_another_round(fed):
    [node, other] = fed.approved_nodes(2)
    first = fed.open_round()
    old = signed(fed, node, first)
    fed.aggregator.submit_signed_batch(first, [old, signed(fed, other, first)])
    finalize(fed, first, b"\0\0")
    second = fed.open_round()
    return lambda: fed.aggregator.submit_signed_batch(second, [old]), [node.address]


@case("WrongSigner")
def replayed_from_another_federation(fed):
    [node] = fed.approved_nodes(1)
    other = deploy(fed.w3, fed.admin.sender.account, fed.aggregator.address)
    round_id = fed.open_round()
    elsewhere = signed(fed, node, round_id, federation=other.address("Federation"))
    return lambda: fed.aggregator.submit_signed_batch(round_id, [elsewhere]), [node.address]


@case("WrongSigner")
def replayed_from_another_chain(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    mainnet = signed(fed, node, round_id, chain_id=1)
    return lambda: fed.aggregator.submit_signed_batch(round_id, [mainnet]), [node.address]


@case("WrongSigner")
def fields_changed_after_signing(fed):
    """The relay inflates the sample count of a genuinely signed update."""
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    honest = signed(fed, node, round_id)
    inflated = replace(honest, fields=replace(honest.fields, num_samples=10**6))
    return lambda: fed.aggregator.submit_signed_batch(round_id, [inflated]), [node.address]


@case("MalleatedSignature")
def malleated_signature(fed):
    """(r, n - s, v ^ 1) is a second valid signature of the same digest; the contract accepts only low s."""
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    honest = signed(fed, node, round_id)
    s = SECP256K1_N - int.from_bytes(honest.s, "big")
    twin = replace(honest, s=s.to_bytes(32, "big"), v=55 - honest.v)
    assert Account.recover_message(twin.message(), vrs=(twin.v, twin.r, twin.s)) == node.address  # plain
    # recovery accepts it
    assert twin.signer() is None
    return lambda: fed.aggregator.submit_signed_batch(round_id, [twin]), [node.address]


@case("InvalidSignature")
def signature_with_bad_v(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    bad = replace(signed(fed, node, round_id), v=29)
    return lambda: fed.aggregator.submit_signed_batch(round_id, [bad]), [node.address]


@case("NotParticipant")
def relayed_for_a_revoked_node(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    update = signed(fed, node, round_id)
    fed.admin.revoke(node.address)
    return lambda: fed.aggregator.submit_signed_batch(round_id, [update]), [node.address, "status Revoked"]


@case("AlreadySubmitted")
def relayed_twice(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    update = signed(fed, node, round_id)
    fed.aggregator.submit_signed_batch(round_id, [update])
    return lambda: fed.aggregator.submit_signed_batch(round_id, [update]), [node.address]


@case("AlreadySubmitted")
def relayed_after_direct(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    submit(fed, node, round_id)
    return lambda: fed.aggregator.submit_signed_batch(round_id, [signed(fed, node, round_id, " again")]), []


@case("DeadlinePassed")
def relayed_late(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    update = signed(fed, node, round_id)
    advance_time(fed.w3, HOUR + 1)
    return lambda: fed.aggregator.submit_signed_batch(round_id, [update]), [f"round {round_id} "]


# The admin role changes hands in two steps -------------------------------------------------------------------------

@case("AccessControlEnforcedDefaultAdminRules")
def grant_admin_directly(fed):
    stranger = fed.node_account(1).address
    call = fed.admin.contract.functions.grantRole(ADMIN_ROLE, stranger)
    return lambda: fed.admin.sender.transact(call), []


@case("AccessControlEnforcedDefaultAdminDelay")
def accept_admin_too_early(fed):
    successor = fed.client(1)
    fed.admin.begin_admin_transfer(successor.address)
    return lambda: successor.accept_admin_transfer(), []


@case("AccessControlInvalidDefaultAdmin")
def stranger_accepts_admin(fed):
    successor, stranger = fed.client(1), fed.client(2)
    fed.admin.begin_admin_transfer(successor.address)
    advance_time(fed.w3, ADMIN_DELAY_S + 1)
    return lambda: stranger.accept_admin_transfer(), [stranger.address]


@case("ZeroDigest")
def submit_zero_cid(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    return lambda: node.submit_update(round_id, ZERO, fed.digest("sha"), 10, ZERO), []


@case("ZeroDigest")
def finalize_zero_sha(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    submit(fed, node, round_id)
    return lambda: fed.aggregator.finalize(round_id, fed.digest("cid"), ZERO, b"\0"), []


@case("ZeroSamples")
def submit_zero_samples(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    return lambda: submit(fed, node, round_id, samples=0), []


@case("DeadlinePassed")
def submit_late(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    deadline = fed.admin.round(round_id).deadline
    advance_time(fed.w3, HOUR + 1)
    return lambda: submit(fed, node, round_id), [f"round {round_id} ", f"closed at {deadline}"]


@case("DeadlineNotPassed")
def cancel_early(fed):
    round_id = fed.open_round()
    deadline = fed.admin.round(round_id).deadline
    return lambda: fed.aggregator.cancel_round(round_id), [f"round {round_id} ", f"open until {deadline}"]


@case("AlreadySubmitted")
def submit_twice(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    submit(fed, node, round_id)
    return lambda: submit(fed, node, round_id, tag=" again"), [node.address, f"round {round_id}"]


@case("VerdictCountMismatch")
def too_many_verdicts(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    submit(fed, node, round_id)
    return lambda: finalize(fed, round_id, b"\0\0"), [f"round {round_id} has 1 submissions but 2 verdicts"]


@case("QuorumNotReached")
def below_quorum_before_deadline(fed):
    nodes = fed.approved_nodes(2)
    round_id = fed.open_round(min_updates=2, allow_below_quorum=True)
    fed.submit_all(round_id, nodes)
    return lambda: finalize(fed, round_id, b"\0\1"), [f"round {round_id} has 1 accepted", "quorum 2"]


@case("QuorumNotReached")
def below_quorum_after_deadline_not_allowed(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round(min_updates=2, allow_below_quorum=False)
    submit(fed, node, round_id)
    advance_time(fed.w3, HOUR + 1)
    return lambda: finalize(fed, round_id, b"\0"), [f"round {round_id} has 1 accepted", "quorum 2"]


@case("QuorumNotReached")
def nothing_accepted(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round(min_updates=1, allow_below_quorum=True)
    submit(fed, node, round_id)
    advance_time(fed.w3, HOUR + 1)
    return lambda: finalize(fed, round_id, b"\7"), [f"round {round_id} has 0 accepted"]


@case("SubmissionsClosed")
def submit_after_unmask_requested(fed):
    first, second = fed.approved_nodes(2)
    round_id = fed.open_round()
    submit(fed, first, round_id)
    fed.aggregator.request_unmask(round_id, fed.digest("survivors"))
    return lambda: submit(fed, second, round_id), [f"round {round_id} takes no more submissions"]


@case("SubmissionsClosed")
def request_unmask_twice(fed):
    round_id = fed.open_round()
    fed.aggregator.request_unmask(round_id, fed.digest("survivors"))
    return lambda: fed.aggregator.request_unmask(round_id, fed.digest("other")), [f"round {round_id} "]


@case("UnmaskNotRequested")
def reveal_before_survivors(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    submit(fed, node, round_id)
    return lambda: node.reveal_shares(round_id, fed.digest("reveal")), [f"round {round_id}'s survivors"]


@case("AlreadyRevealed")
def reveal_twice(fed):
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    fed.aggregator.request_unmask(round_id, fed.digest("survivors"))
    node.reveal_shares(round_id, fed.digest("reveal"))
    return lambda: node.reveal_shares(round_id, fed.digest("again")), [node.address, f"round {round_id}"]


@case("NotParticipant")
def stranger_reveals(fed):
    stranger = fed.client(1)
    round_id = fed.open_round()
    fed.aggregator.request_unmask(round_id, fed.digest("survivors"))
    return lambda: stranger.reveal_shares(round_id, fed.digest("reveal")), [stranger.address, "status None"]


@case("NotAggregator")
def admin_requests_unmask(fed):
    round_id = fed.open_round()
    return lambda: fed.admin.request_unmask(round_id, fed.digest("survivors")), [fed.admin.address]


@case("AccessControlUnauthorizedAccount")
def node_approves(fed):
    node, other = fed.joined_nodes([1, 2])
    return lambda: node.approve(other.address), [node.address, "lacks the admin role"]


@case("AccessControlUnauthorizedAccount")
def aggregator_grants_role(fed):
    stranger = fed.node_account(1).address
    return lambda: fed.aggregator.grant_aggregator(stranger), [fed.aggregator.address, "lacks the admin role"]


@case("AccessControlBadConfirmation")
def renounce_for_another_account(fed):
    admin = fed.admin
    call = admin.contract.functions.renounceRole(ADMIN_ROLE, fed.aggregator.address)
    return lambda: admin.sender.transact(call), []


# Library errors no call can reach: EIP712's name and version are constants, and every SafeCast the admin rules
# do is of a block timestamp plus a uint48 delay.
UNREACHABLE = {"InvalidShortString", "StringTooLong", "SafeCastOverflowedUintDowncast"}


def test_every_abi_error_has_a_case():
    abi_errors = {item["name"] for item in load_artifact("Federation")["abi"] if item["type"] == "error"}
    assert {name for name, _ in CASES.values()} == abi_errors - UNREACHABLE


@pytest.mark.parametrize("error_name, scenario", CASES.values(), ids=CASES.keys())
def test_custom_error(embedded_fed, error_name, scenario):
    action, fragments = scenario(embedded_fed)
    with pytest.raises(ChainError) as info:
        action()
    message = str(info.value)
    assert info.value.error_name == error_name
    assert message.startswith(f"{error_name}: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_a_refused_transaction_uses_no_nonce(embedded_fed):
    fed = embedded_fed
    [node] = fed.joined_nodes([1])
    nonce = fed.w3.eth.get_transaction_count(node.address)
    with pytest.raises(ChainError):
        node.join(fed.digest("model"), fed.digest("card"))
    assert fed.w3.eth.get_transaction_count(node.address) == nonce
    fed.admin.approve(node.address)
    round_id = fed.open_round()
    assert submit(fed, node, round_id).gas_used > 0


# Verdict counting, revocation, transactions in flight ------------------------------------------------------------

def verdict_pattern(rng: random.Random, length: int, rejected_at_least: int = 0) -> bytes:
    """Zero (merged) or a non-zero reason code per submission, with at least one zero; the codes include the
    bytes a word-wise count finds hardest (0x01, 0x7f, 0x80, 0xff)."""
    codes = [0x01, 0x7F, 0x80, 0xFF, rng.randint(2, 254)]
    pattern = [0 if rng.random() < 0.5 else rng.choice(codes) for _ in range(length)]
    merged, *rejected = rng.sample(range(length), 1 + rejected_at_least)
    pattern[merged] = 0
    for position in rejected:
        pattern[position] = rng.choice(codes)
    return bytes(pattern)


def test_accepted_counts_zero_verdicts_across_word_boundaries(embedded_fed):
    """Rounds of 1 to 65 submissions: the count QuorumNotReached reports before the deadline (several patterns per
    round) and the `accepted` a finalize stores after it equal Python's count of zero bytes."""
    fed = embedded_fed
    rng = random.Random(20240607)
    nodes = fed.approved_nodes(65)
    for length in (1, 31, 32, 33, 64, 65):
        round_id = fed.open_round(min_updates=length, allow_below_quorum=True)
        fed.submit_all(round_id, nodes[:length])
        for _ in range(4 if length > 1 else 0):
            pattern = verdict_pattern(rng, length, rejected_at_least=1)
            with pytest.raises(ChainError) as info:
                finalize(fed, round_id, pattern)
            assert info.value.error_name == "QuorumNotReached"
            assert info.value.error_args == (round_id, pattern.count(0), length)
        advance_time(fed.w3, HOUR + 1)
        pattern = verdict_pattern(rng, length)
        receipt = finalize(fed, round_id, pattern)
        assert event_args(fed.aggregator, receipt, "RoundFinalized")["accepted"] == pattern.count(0)
        assert fed.admin.round(round_id).accepted == pattern.count(0)


def test_revocation_keeps_earlier_submissions_and_refuses_later_ones(embedded_fed):
    fed = embedded_fed
    node, other = fed.approved_nodes(2)
    first = fed.open_round()
    submit(fed, node, first)
    submit(fed, other, first)
    fed.admin.revoke(node.address, reason=1)
    finalize(fed, first, b"\0\0")
    second = fed.open_round()
    with pytest.raises(ChainError) as info:
        submit(fed, node, second)
    assert info.value.error_name == "NotParticipant"
    submit(fed, other, second)
    submitted = [(e.args["roundId"], e.args["node"]) for e in fed.admin.events() if e.name == "UpdateSubmitted"]
    assert submitted == [(first, node.address), (first, other.address), (second, other.address)]
    assert fed.admin.submission_commitment(first, node.address) != ZERO


def test_submissions_from_five_nodes_in_flight(embedded_fed):
    fed = embedded_fed
    nodes = fed.approved_nodes(5)
    round_id = fed.open_round()
    hashes = fed.submit_all(round_id, nodes)
    assert len(set(hashes)) == 5
    events = [e.args for e in fed.admin.events() if e.name == "UpdateSubmitted"]
    assert sorted((e["index"], e["node"]) for e in events) == sorted(enumerate(n.address for n in nodes))
    assert fed.admin.round(round_id).submissions == 5


def test_one_sender_with_several_transactions_in_flight(embedded_fed):
    fed = embedded_fed
    nodes = fed.joined_nodes(range(1, 6))
    admin = fed.admin
    start = fed.w3.eth.get_transaction_count(admin.address)
    hashes = [admin.sender.transact(admin.contract.functions.approve(n.address), wait=False) for n in nodes]
    receipts = [admin.sender.wait(h) for h in hashes]
    assert [fed.w3.eth.get_transaction(h)["nonce"] for h in hashes] == list(range(start, start + 5))
    assert all(admin.participant(n.address).status == Status.APPROVED for n in nodes)
    assert len({r.tx_hash for r in receipts}) == 5
