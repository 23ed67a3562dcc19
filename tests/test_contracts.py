"""The Federation contract on the embedded chain: every external function's success path (events and stored
state), every custom error in its ABI, the verdict counting, revocation, and several transactions in flight."""
from __future__ import annotations

import random

import pytest
from eth_abi import encode
from web3 import Web3

from chain.clients import Participant, RoundInfo, RoundState, Status
from chain.compiler import load_artifact
from chain.connection import advance_time
from chain.deployment import AGGREGATOR_ROLE
from chain.errors import ChainError

ADMIN_ROLE = b"\0" * 32
ZERO = b"\0" * 32
HOUR = 3600


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
def test_open_round_stores_and_announces_the_round(embedded_fed, opener):
    fed = embedded_fed
    client = getattr(fed, opener)
    deadline = client.chain_time() + HOUR
    round_id, receipt = client.open_round(fed.digest("cid"), fed.digest("sha"), fed.digest("rules"), deadline, 3,
                                          allow_below_quorum=False)
    assert round_id == 1 == client.round_count()
    assert event_args(client, receipt, "RoundOpened") == {
        "roundId": 1, "opener": client.address, "baseCidDigest": fed.digest("cid"), "baseSha256": fed.digest("sha"),
        "rulesDigest": fed.digest("rules"), "deadline": deadline, "minUpdates": 3, "allowBelowQuorum": False}
    assert client.round(1) == RoundInfo(1, deadline, 3, 0, 0, RoundState.OPEN, False)


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
    return lambda: fed.open_round(label="next"), [f"round {round_id} "]


@case("InvalidDeadline")
def deadline_now(fed):
    now = fed.admin.chain_time()
    return lambda: fed.open_round(duration=0), [str(now)]


@case("InvalidQuorum")
def zero_quorum(fed):
    return lambda: fed.open_round(min_updates=0), []


@case("ZeroDigest")
def open_with_zero_rules(fed):
    agg = fed.aggregator
    return lambda: agg.open_round(fed.digest("cid"), fed.digest("sha"), ZERO, agg.chain_time() + HOUR, 1), []


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


def test_every_abi_error_has_a_case():
    abi_errors = {item["name"] for item in load_artifact("Federation")["abi"] if item["type"] == "error"}
    assert {name for name, _ in CASES.values()} == abi_errors


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
        round_id = fed.open_round(min_updates=length, allow_below_quorum=True, label=f"len {length}")
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
    second = fed.open_round(label="second")
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
