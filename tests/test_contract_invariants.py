"""Stateful property-based testing of the Federation contract on the embedded chain (hypothesis). Each example is a
random sequence of joins, approvals, revocations, rule changes, opens (from the lineage head or not, under the
federation's rules or not, by the aggregator, an admin or a node), direct submissions, relayed batches (valid,
forged, replayed from another round, chain or federation, tampered, malleated), finalizations, cancellations and
clock jumps. A reference model predicts the outcome of every call (the custom error or success); after every
step the invariants are checked and the state rebuilt from the events alone is compared with the contract's views:

- at most one submission per node per round, and none from a signer that was not approved at the time;
- accepted = the number of zero verdict bytes; a round finalizes or is cancelled at most once;
- lineage: every round opens from the last finalized global adapter (the initial one first), under the rules
  in force;
- the events reconstruct exactly the contract's view state (rounds, commitments, participants, lineage, rules).

FEDCHAIN_FUZZ_EXAMPLES (default 2000) sets the number of sequences, FEDCHAIN_FUZZ_STEPS (default 10) their length.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace

from eth_abi import decode, encode
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from web3 import Web3

from chain.clients import Federation, RoundState, Status
from chain.compiler import load_artifact
from chain.commitments import result_commitment, submission_commitment
from chain.connection import EMBEDDED, connect
from chain.deployment import deploy
from chain.errors import decode_revert
from chain.signing import UpdateFields, sign_update
from chain.wallet import dev_account
from eth.vm.message import Message
from eth_tester.backends.pyevm.main import EVMSpoofTransaction
from eth_utils import function_signature_to_4byte_selector, to_canonical_address

EXAMPLES = int(os.environ.get("FEDCHAIN_FUZZ_EXAMPLES", "2000"))
STEPS = int(os.environ.get("FEDCHAIN_FUZZ_STEPS", "10"))
NODES = 5                     # dev accounts 1..5; 6 forges, 0 is the admin, 9 the aggregator
JOINED, APPROVED = 4, 3       # at the start of every sequence: nodes 0-2 approved, node 3 pending, node 4 unknown,
                              # and round 1 open (from the initial adapter, quorum 1) for ten round lengths
ROUND_SECONDS = 3600
JUMPS = (60, 2 * ROUND_SECONDS)  # clock moves far from any deadline, so no block-time rounding decides an outcome
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
GAS = 3_000_000
ZERO = bytes(32)


def digest(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


INITIAL, RULES = (digest("initial cid"), digest("initial sha")), digest("rules 0")


def _abi_type(item: dict) -> str:
    """The canonical type of an ABI input or output, structs (and arrays of them) spelt out as tuples."""
    if item["type"].startswith("tuple"):
        return f"({','.join(_abi_type(c) for c in item['components'])}){item['type'][5:]}"
    return item["type"]


class Chain:
    """Two federations deployed and configured on the embedded chain (the second only as a replay target), then
    driven on py-evm's state directly, as Foundry's invariant tests drive revm: every call runs the deployed bytecode
    on one in-memory state, a sequence ends by reverting that state to the snapshot taken after deployment, and
    the clock is the execution context's timestamp (mining a block per call through eth-tester and web3 costs ~30
    times more)."""

    def __init__(self):
        w3 = connect(EMBEDDED)
        self.admin, self.aggregator = dev_account(w3, 0), dev_account(w3, 9)
        self.nodes = [dev_account(w3, i) for i in range(1, NODES + 1)]
        self.forger = dev_account(w3, 6)
        deployment = deploy(w3, self.admin, self.aggregator.address)
        self.other = deploy(w3, self.admin, self.aggregator.address).address("Federation")
        Federation(w3, deployment, self.aggregator).configure(*INITIAL, RULES)
        admin = Federation(w3, deployment, self.admin)
        for i, account in enumerate(self.nodes[:JOINED]):  # a head start, so short sequences reach the rounds
            admin.as_account(account).join(digest(f"model {i}"), digest(f"card {i}"))
            if i < APPROVED:
                admin.approve(account.address)
        aggregator = Federation(w3, deployment, self.aggregator)
        self.first_deadline = aggregator.next_block_time() + 10 * ROUND_SECONDS
        aggregator.open_round(*INITIAL, RULES, self.first_deadline, 1, True)
        self.address, self.chain_id = deployment.address("Federation"), deployment.chain_id
        self.canonical = to_canonical_address(self.address)
        contract = w3.eth.contract(address=self.address, abi=load_artifact("Federation")["abi"])
        self.events = {Web3.keccak(text=f"{e.abi['name']}({','.join(i['type'] for i in e.abi['inputs'])})"): e.abi
                       for e in contract.events}
        functions = [f.abi for f in contract.all_functions()]
        self.outputs = {f["name"]: [_abi_type(o) for o in f["outputs"]] for f in functions}
        self.inputs = {f["name"]: [_abi_type(i) for i in f["inputs"]] for f in functions}
        self.selectors = {name: function_signature_to_4byte_selector(f"{name}({','.join(types)})")
                          for name, types in self.inputs.items()}
        self.vm = w3.provider.ethereum_tester.backend.chain.get_vm()  # the pending block's VM
        self.state = self.vm.state
        self.code = self.state.get_code(self.canonical)
        for precompile in range(1, 11):  # as on mainnet, the precompiles hold a balance: py-evm then never clears
            # them as touched empty accounts, which its journal cannot undo across one long-lived snapshot
            self.state.set_balance(precompile.to_bytes(20, "big"), 1)
        self.start = self.state.timestamp
        self.snapshot = self.state.snapshot()

    def reset(self) -> None:
        """Back to the state right after deployment and configuration."""
        self.state.revert(self.snapshot)
        self.snapshot = self.state.snapshot()
        self.state.execution_context._timestamp = self.start

    @property
    def now(self) -> int:
        return self.state.timestamp

    def jump(self, seconds: int) -> None:
        self.state.execution_context._timestamp += seconds

    def calldata(self, fn: str, args) -> bytes:
        """ABI-encoded call (eth-abi directly: web3's encode_abi costs milliseconds a call)."""
        return self.selectors[fn] + encode(self.inputs[fn], list(args))

    def _apply(self, sender: str, data: bytes):
        """Run a call from `sender` as a transaction on the state (no signature: py-evm's spoofed sender)."""
        origin = to_canonical_address(sender)
        return self.state.apply_transaction(EVMSpoofTransaction(self._tx(origin, data), from_=origin))

    def _tx(self, origin: bytes, data: bytes):
        return self.vm.create_unsigned_transaction(nonce=self.state.get_nonce(origin), gas_price=10**10, gas=GAS,
                                                   to=self.canonical, value=0, data=data)

    def transact(self, sender: str, fn: str, *args) -> tuple[str | None, list[tuple[str, dict]]]:
        """(custom error name or None, decoded events) of `fn(*args)` sent by `sender`."""
        computation = self._apply(sender, self.calldata(fn, args))
        if computation.is_error:
            return decode_revert(computation.output).error_name or "unknown", []
        return None, [self._decode(topics, data) for _, topics, data in computation.get_log_entries()]

    def view(self, fn: str, *args):
        """A view function's decoded result: a static message run on the state (no transaction around it)."""
        origin = to_canonical_address(self.admin.address)
        message = Message(gas=GAS, to=self.canonical, sender=origin, value=0, data=self.calldata(fn, args),
                          code=self.code, is_static=True)
        context = self.state.get_transaction_context(EVMSpoofTransaction(self._tx(origin, b""), from_=origin))
        computation = self.state.computation_class.apply_message(self.state, message, context)
        assert not computation.is_error, f"view {fn} reverted"
        out = decode(self.outputs[fn], computation.output)
        return out[0] if len(out) == 1 else out

    def _decode(self, topics: list[int], data: bytes) -> tuple[str, dict]:
        topics = [t.to_bytes(32, "big") for t in topics]
        abi = self.events[topics[0]]
        indexed = [i for i in abi["inputs"] if i["indexed"]]
        plain = [i for i in abi["inputs"] if not i["indexed"]]
        args = dict(zip((i["name"] for i in plain), decode([i["type"] for i in plain], data)))
        for i, topic in zip(indexed, topics[1:]):
            args[i["name"]] = decode([i["type"]], topic)[0]
        return abi["name"], {k: Web3.to_checksum_address(v) if isinstance(v, str) and v.startswith("0x") and
                             len(v) == 42 else v for k, v in args.items()}


CHAIN: Chain | None = None


def chain() -> Chain:
    global CHAIN
    if CHAIN is None:
        CHAIN = Chain()
    return CHAIN


@dataclass
class RoundModel:
    deadline: int
    min_updates: int
    allow_below_quorum: bool
    base: tuple[bytes, bytes]
    rules: bytes
    submissions: list[tuple[str, tuple]] = field(default_factory=list)  # (node, (cid, sha, samples, metrics))
    state: RoundState = RoundState.OPEN
    accepted: int = 0
    result: tuple[bytes, bytes, bytes] | None = None  # (cid, sha, verdicts)


@dataclass
class Model:
    """What the contract must hold, built only from the events it emitted (plus the predictions the rules check
    against)."""
    status: dict[str, Status]
    joined: dict[str, tuple[bytes, bytes]]
    rounds: list[RoundModel]
    head: tuple[bytes, bytes] = INITIAL  # as configured right after deployment
    rules: bytes = RULES
    finalized_or_cancelled: list[int] = field(default_factory=list)

    def apply(self, name: str, a: dict, now: int) -> None:
        if name == "Joined":
            assert a["node"] not in self.status
            self.status[a["node"]] = Status.PENDING
            self.joined[a["node"]] = (a["modelId"], a["metadataDigest"])
        elif name == "Approved":
            self.status[a["node"]] = Status.APPROVED
        elif name == "Revoked":
            self.status[a["node"]] = Status.REVOKED
        elif name == "Configured":
            raise AssertionError("configured twice")
        elif name == "RulesChanged":
            assert a["previousDigest"] == self.rules
            self.rules = a["rulesDigest"]
        elif name == "RoundOpened":
            assert a["roundId"] == len(self.rounds) + 1
            # lineage: from the last finalized global adapter (the initial one first), under the rules in force
            assert (a["baseCidDigest"], a["baseSha256"]) == self.head and a["rulesDigest"] == self.rules != ZERO
            assert not self.rounds or self.rounds[-1].state != RoundState.OPEN
            self.rounds.append(RoundModel(a["deadline"], a["minUpdates"], a["allowBelowQuorum"], self.head,
                                          a["rulesDigest"]))
        elif name == "UpdateSubmitted":
            r = self.rounds[a["roundId"] - 1]
            assert r.state == RoundState.OPEN and now <= r.deadline
            assert self.status.get(a["node"]) == Status.APPROVED  # no submission from a non-approved signer
            assert a["node"] not in {n for n, _ in r.submissions}  # at most one per node per round
            assert a["index"] == len(r.submissions)
            r.submissions.append((a["node"], (a["cidDigest"], a["fileSha256"], a["numSamples"],
                                              a["metricsDigest"])))
        elif name == "RoundFinalized":
            r = self.rounds[a["roundId"] - 1]
            assert r.state == RoundState.OPEN  # finalizes at most once, never after a cancel
            assert a["accepted"] == a["verdicts"].count(0) and len(a["verdicts"]) == len(r.submissions)
            r.state, r.accepted = RoundState.FINALIZED, a["accepted"]
            r.result = (a["cidDigest"], a["fileSha256"], a["verdicts"])
            self.head = (a["cidDigest"], a["fileSha256"])
            self.finalized_or_cancelled.append(a["roundId"])
        elif name == "RoundCancelled":
            r = self.rounds[a["roundId"] - 1]
            assert r.state == RoundState.OPEN
            r.state = RoundState.CANCELLED
            self.finalized_or_cancelled.append(a["roundId"])
        # OpenZeppelin's role events carry no federation state the views below compare

    @property
    def open_round(self) -> RoundModel | None:
        return self.rounds[-1] if self.rounds and self.rounds[-1].state == RoundState.OPEN else None


nodes = st.integers(0, NODES - 1)
mostly_approved = st.sampled_from([i for i in range(NODES) for _ in range(3 if i < APPROVED else 1)])
FORGERIES = ("none", "forged", "other_round", "other_chain", "other_federation", "tampered", "malleated", "bad_v")
SIGNATURE_ERRORS = {"malleated": "MalleatedSignature", "bad_v": "InvalidSignature"}  # the others: WrongSigner


class FederationMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.chain = chain()
        self.chain.reset()
        accounts = self.chain.nodes
        self.model = Model(
            status={a.address: Status.APPROVED if i < APPROVED else Status.PENDING
                    for i, a in enumerate(accounts[:JOINED])},
            joined={a.address: (digest(f"model {i}"), digest(f"card {i}")) for i, a in enumerate(accounts[:JOINED])},
            rounds=[RoundModel(self.chain.first_deadline, 1, True, INITIAL, RULES)])
        self.tag = 0
        self.touched: set[str] = set()
        self.changed = False

    # ---- sending, with the outcome the model predicts -------------------------------------------------------
    def send(self, sender: str, fn: str, args: tuple, expected: str | None) -> None:
        now = self.chain.now
        error, events = self.chain.transact(sender, fn, *args)
        assert error == expected, f"{fn}{args[:1]}: expected {expected or 'success'}, got {error or 'success'}"
        self.changed |= bool(events)
        for name, a in events:
            self.model.apply(name, a, now)
            if "node" in a:
                self.touched.add(a["node"])

    def fresh(self, label: str) -> bytes:
        self.tag += 1
        return digest(f"{label} {self.tag}")

    def round_error(self, round_id: int) -> str | None:
        """What any submission to `round_id` must fail with, before its sender or signature is looked at."""
        r = self.model.rounds[round_id - 1] if 0 < round_id <= len(self.model.rounds) else None
        if r is None:
            return "UnknownRound"
        if r.state != RoundState.OPEN:
            return "RoundNotOpen"
        if self.chain.now > r.deadline:
            return "DeadlinePassed"
        return None

    def node_error(self, node: str, samples: int, round_id: int, batch_nodes=()) -> str | None:
        """What a submission of `node` to open round `round_id` must fail with (a relayed one after its
        signature)."""
        r = self.model.rounds[round_id - 1]
        if self.model.status.get(node, Status.NONE) != Status.APPROVED:
            return "NotParticipant"
        if samples == 0:
            return "ZeroSamples"
        if node in {n for n, _ in r.submissions} or node in batch_nodes:
            return "AlreadySubmitted"
        return None

    # ---- registry --------------------------------------------------------------------------------------------
    @rule(action=st.sampled_from(["join", "approve", "approve", "approve_as_aggregator", "revoke", "change_rules",
                                  "change_rules_as_aggregator", "configure_again"]), i=nodes)
    def registry(self, action, i):
        """Identities and governance: only an admin approves, revokes and changes the rules; nobody configures
        twice."""
        if action in ("change_rules", "change_rules_as_aggregator", "configure_again"):
            self.governance(action)
            return
        node = self.chain.nodes[i].address
        status = self.model.status.get(node, Status.NONE)
        if action == "join":
            self.send(node, "join", (digest(f"model {i}"), digest(f"card {i}")),
                      None if status == Status.NONE else "AlreadyJoined")
        elif action == "revoke":
            self.send(self.chain.admin.address, "revoke", (node, 1),
                      None if status in (Status.PENDING, Status.APPROVED) else "NotApproved")
        elif action == "approve":
            self.send(self.chain.admin.address, "approve", (node,), None if status == Status.PENDING else "NotPending")
        else:
            self.send(self.chain.aggregator.address, "approve", (node,), "AccessControlUnauthorizedAccount")

    def governance(self, action):
        if action == "configure_again":
            self.send(self.chain.admin.address, "configure", (self.fresh("cid"), self.fresh("sha"),
                                                             self.fresh("rules")), "AlreadyConfigured")
        else:
            admin = action == "change_rules"
            sender = self.chain.admin if admin else self.chain.aggregator
            self.send(sender.address, "changeRules", (self.fresh("rules"),),
                      None if admin else "AccessControlUnauthorizedAccount")

    # ---- rounds ----------------------------------------------------------------------------------------------
    @rule(by=st.sampled_from(["aggregator"] * 4 + ["admin", "node"]),
          base=st.sampled_from(["head"] * 6 + ["initial", "other", "other_sha"]), under=st.sampled_from(["current"] * 6 + ["other"]),
          min_updates=st.sampled_from([1, 1, 2, 3, 0]), allow=st.booleans())
    def open(self, by, base, under, min_updates, allow):
        sender = {"aggregator": self.chain.aggregator, "admin": self.chain.admin, "node": self.chain.nodes[0]}[by]
        start = {"head": self.model.head, "initial": INITIAL, "other": (self.fresh("cid"), self.model.head[1]),
                 "other_sha": (self.model.head[0], self.fresh("sha"))}[base]
        rules = self.model.rules if under == "current" else self.fresh("rules")
        if by == "node":
            expected = "NotCoordinator"
        elif rules != self.model.rules:
            expected = "RulesMismatch"
        elif start != self.model.head:
            expected = "LineageBroken"
        elif min_updates == 0:
            expected = "InvalidQuorum"
        elif self.model.open_round is not None:
            expected = "PreviousRoundOpen"
        else:
            expected = None
        self.send(sender.address, "openRound", (*start, rules, self.chain.now + ROUND_SECONDS, min_updates, allow),
                  expected)

    @rule(i=nodes, samples=st.sampled_from([0, 7, 100]))
    def submit_direct(self, i, samples):
        node = self.chain.nodes[i].address
        round_id = len(self.model.rounds)
        expected = self.round_error(round_id) or self.node_error(node, samples, round_id)
        self.send(node, "submitUpdate", (round_id, self.fresh("cid"), self.fresh("sha"), samples, self.fresh("m")),
                  expected)

    @rule(members=st.lists(mostly_approved, min_size=1, max_size=4),
          forgery=st.sampled_from(("none",) * 7 + FORGERIES[1:]),
          position=st.integers(0, 3))
    def submit_relayed(self, members, forgery, position):
        """Anyone (here a node, not the aggregator) relays updates its members signed; one of them is forged,
        replayed or malleated as `forgery` says."""
        round_id = len(self.model.rounds)
        c = self.chain
        updates = []
        for i in members:
            fields = UpdateFields(round_id, self.fresh("cid"), self.fresh("sha"), 100, self.fresh("m"))
            updates.append(sign_update(c.nodes[i], c.chain_id, c.address, fields))
        at = position % len(updates)
        u = updates[at]
        account = c.nodes[members[at]]
        if forgery == "forged":
            u = replace(sign_update(c.forger, c.chain_id, c.address, u.fields), node=u.node)
        elif forgery == "other_round":
            u = sign_update(account, c.chain_id, c.address, replace(u.fields, round_id=round_id + 1))
            u = replace(u, fields=replace(u.fields, round_id=round_id))
        elif forgery == "other_chain":
            u = replace(sign_update(account, 1, c.address, u.fields), chain_id=c.chain_id)
        elif forgery == "other_federation":
            u = replace(sign_update(account, c.chain_id, c.other, u.fields), federation=c.address)
        elif forgery == "tampered":
            u = replace(u, fields=replace(u.fields, num_samples=10**6))
        elif forgery == "malleated":
            u = replace(u, s=(SECP256K1_N - int.from_bytes(u.s, "big")).to_bytes(32, "big"), v=55 - u.v)
        elif forgery == "bad_v":
            u = replace(u, v=29)
        updates[at] = u
        expected, seen = self.round_error(round_id), []  # the round is checked once, before any signature
        for k, update in enumerate(updates if expected is None else []):
            if k == at and forgery != "none":
                expected = SIGNATURE_ERRORS.get(forgery, "WrongSigner")
                break
            expected = self.node_error(update.node, 100, round_id, seen)
            if expected is not None:
                break
            seen.append(update.node)
        self.send(c.nodes[0].address, "submitSignedBatch", (round_id, [x.as_call_arg() for x in updates]), expected)

    @precondition(lambda self: self.model.open_round is None or self.model.open_round.submissions)
    @rule(by_admin=st.sampled_from([False] * 5 + [True]),
          rejected=st.lists(st.sampled_from([False, False, False, True]), max_size=6) | st.just([]),
          extra=st.sampled_from([0] * 6 + [-1, 1]), cancel=st.sampled_from([False] * 3 + [True]),
          reopen=st.sampled_from([None] + ["head"] * 4 + ["initial", "other", "other_sha"]))
    def close(self, by_admin, rejected, extra, cancel, reopen):
        """Finalize the latest round (as the aggregator, mostly with one verdict per submission), or cancel it;
        then, mostly, open the next one (from the lineage head, mostly)."""
        if cancel:
            self.cancel()
        else:
            self.finalize(by_admin, rejected, extra)
        if reopen is not None:
            self.open("aggregator", reopen, "current", 1, True)

    def finalize(self, by_admin, rejected, extra):
        r, round_id = self.model.open_round, len(self.model.rounds)
        count = len(r.submissions) + extra if r is not None else max(0, extra)
        verdicts = bytes((7 if (rejected[i] if i < len(rejected) else False) else 0) for i in range(max(count, 0)))
        accepted = verdicts.count(0)
        if by_admin:
            expected = "NotAggregator"
        elif round_id == 0:
            expected = "UnknownRound"
        elif r is None:
            expected = "RoundNotOpen"
        elif len(verdicts) != len(r.submissions):
            expected = "VerdictCountMismatch"
        elif accepted == 0 or (accepted < r.min_updates and not (r.allow_below_quorum
                                                                  and self.chain.now > r.deadline)):
            expected = "QuorumNotReached"
        else:
            expected = None
        sender = self.chain.admin if by_admin else self.chain.aggregator
        self.send(sender.address, "finalize", (max(round_id, 1), self.fresh("global"), self.fresh("global sha"),
                                               verdicts), expected)

    def cancel(self):
        r, round_id = self.model.open_round, len(self.model.rounds)
        expected = ("UnknownRound" if round_id == 0 else "RoundNotOpen" if r is None else
                    "DeadlineNotPassed" if self.chain.now <= r.deadline else None)
        self.send(self.chain.aggregator.address, "cancelRound", (max(round_id, 1),), expected)

    @rule(seconds=st.sampled_from(JUMPS))
    def wait(self, seconds):
        self.chain.jump(seconds)

    # ---- invariants ------------------------------------------------------------------------------------------
    @invariant()
    def views_match_the_events(self):
        """The contract's views equal the state rebuilt from its events: after a step that emitted events, the
        latest round and the participants it touched; at the end of the sequence, every round and participant
        (a refused call must leave all of it unchanged)."""
        if self.changed:
            self.compare(rounds=self.model.rounds[-1:], participants=self.touched)
        self.touched, self.changed = set(), False

    def teardown(self):
        self.compare(rounds=self.model.rounds, participants=[n.address for n in self.chain.nodes])

    def compare(self, rounds, participants) -> None:
        c, m = self.chain, self.model
        view = c.view

        assert view("roundCount") == len(m.rounds)
        assert tuple(view("lineageHead")) == m.head and view("rulesDigest") == m.rules
        assert len(m.finalized_or_cancelled) == len(set(m.finalized_or_cancelled))
        first = len(m.rounds) - len(rounds) + 1
        for round_id, r in enumerate(rounds, start=first):
            assert tuple(view("getRound", round_id)) == (r.deadline, r.min_updates, len(r.submissions), r.accepted,
                                                           r.state, r.allow_below_quorum, False)  # never unmasked
            submitted = dict(r.submissions)
            for account in c.nodes + [c.forger]:
                node = account.address
                expected = ZERO
                if node in submitted:
                    index = [n for n, _ in r.submissions].index(node)
                    expected = submission_commitment(index, *submitted[node])
                assert view("submissionOf", round_id, node) == expected
            assert view("resultOf", round_id) == (result_commitment(*r.result) if r.result else ZERO)
        for node in participants:
            p = view("participant", node)
            assert Status(p[2]) == m.status.get(node, Status.NONE)
            assert (p[0], p[1]) == m.joined.get(node, (ZERO, ZERO))


FederationMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(HealthCheck))
test_federation_invariants = FederationMachine.TestCase

