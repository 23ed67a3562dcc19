"""Turn revert data into one readable line naming the contract's custom error and its arguments."""
from __future__ import annotations

from functools import lru_cache

from eth_abi import decode
from eth_utils import function_signature_to_4byte_selector, keccak, to_checksum_address

from .compiler import CONTRACTS, load_artifact

STATUS = ("None", "Pending", "Approved", "Revoked")
ROUND_STATE = ("None", "Open", "Finalized", "Cancelled")


class ChainError(RuntimeError):
    """A transaction or call failed; the message is one line fit for a user."""

    def __init__(self, message: str, error_name: str | None = None, args: tuple = ()):
        super().__init__(message)
        self.error_name = error_name
        self.error_args = args


ROLE_NAMES = {"0x" + "00" * 32: "admin", "0x" + keccak(text="AGGREGATOR_ROLE").hex(): "aggregator"}


def _fmt(value, type_: str):
    if type_ in ("bytes32", "bytes"):
        return "0x" + bytes(value).hex()
    if type_ == "address":
        return to_checksum_address(value)
    return value


_TEMPLATES = {
    "NotParticipant": lambda a: f"{a[0]} is not an approved participant (status {STATUS[a[1]]})",
    "AlreadyJoined": lambda a: f"{a[0]} has already joined (status {STATUS[a[1]]})",
    "NotPending": lambda a: f"{a[0]} is not waiting for approval (status {STATUS[a[1]]})",
    "NotApproved": lambda a: f"{a[0]} is not an approved or pending participant (status {STATUS[a[1]]})",
    "ZeroModelId": lambda a: "the model identity must not be zero",
    "NotAggregator": lambda a: f"{a[0]} does not hold the aggregator role",
    "NotCoordinator": lambda a: f"{a[0]} holds neither the aggregator nor the admin role",
    "AccessControlUnauthorizedAccount": lambda a: f"{a[0]} lacks the {ROLE_NAMES.get(a[1], a[1])} role",
    "AccessControlEnforcedDefaultAdminRules": lambda a: "the admin role changes hands only by a two-step transfer",
    "AccessControlEnforcedDefaultAdminDelay": lambda a: f"the admin transfer can be accepted from time {a[0]}",
    "AccessControlInvalidDefaultAdmin": lambda a: f"{a[0]} is not the pending admin",
    "AlreadyConfigured": lambda a: "the initial adapter and rules are already registered",
    "NotConfigured": lambda a: "the initial adapter and rules are not registered yet",
    "LineageBroken": lambda a: f"a round must start from the last global adapter {a[0]} (sha256 {a[1]}), not {a[2]}",
    "RulesMismatch": lambda a: f"the federation's rules are {a[0]}, not {a[1]}; an admin must change them first",
    "InvalidSignature": lambda a: f"the signature of {a[0]}'s update recovers to no address",
    "MalleatedSignature": lambda a: f"the signature of {a[0]}'s update has a high s {a[1]} (malleated)",
    "WrongSigner": lambda a: f"the update names {a[0]} but its signature is by {a[1]} over its fields",
    "UnknownRound": lambda a: f"round {a[0]} does not exist",
    "RoundNotOpen": lambda a: f"round {a[0]} is not open (state {ROUND_STATE[a[1]]})",
    "PreviousRoundOpen": lambda a: f"round {a[0]} is still open; finalize or cancel it first",
    "InvalidDeadline": lambda a: f"deadline {a[0]} is not after the chain's time {a[1]}",
    "InvalidQuorum": lambda a: "the minimum number of updates must be at least 1",
    "ZeroDigest": lambda a: "a digest is zero",
    "ZeroSamples": lambda a: "the number of training samples must be at least 1",
    "DeadlinePassed": lambda a: f"round {a[0]} closed at {a[1]} (chain time {a[2]})",
    "DeadlineNotPassed": lambda a: f"round {a[0]} is open until {a[1]}",
    "AlreadySubmitted": lambda a: f"{a[1]} already submitted an update to round {a[0]}",
    "VerdictCountMismatch": lambda a: f"round {a[0]} has {a[1]} submissions but {a[2]} verdicts were given",
    "QuorumNotReached": lambda a: f"round {a[0]} has {a[1]} accepted updates, fewer than its quorum {a[2]}",
    "SubmissionsClosed": lambda a: f"round {a[0]} takes no more submissions: its survivors are fixed for unmasking",
    "UnmaskNotRequested": lambda a: f"round {a[0]}'s survivors are not fixed yet: no shares can be revealed",
    "AlreadyRevealed": lambda a: f"{a[1]} already revealed its shares for round {a[0]}",
}


@lru_cache(maxsize=1)
def _error_abis() -> dict[bytes, tuple[str, list[str]]]:
    table = {}
    for name in CONTRACTS:
        for item in load_artifact(name)["abi"]:
            if item["type"] == "error":
                types = [i["type"] for i in item["inputs"]]
                table[function_signature_to_4byte_selector(f"{item['name']}({','.join(types)})")] = \
                    (item["name"], types)
    return table


def decode_revert(data: bytes | str | None) -> ChainError:
    """A ChainError for raw revert data (custom error, Error(string) or nothing)."""
    if isinstance(data, str):
        data = bytes.fromhex(data.removeprefix("0x")) if data else b""
    data = data or b""
    if len(data) < 4:
        return ChainError("transaction reverted without a reason")
    selector, body = data[:4], data[4:]
    if selector == bytes.fromhex("08c379a0"):  # Error(string)
        return ChainError(f"reverted: {decode(['string'], body)[0]}")
    known = _error_abis().get(selector)
    if known is None:
        return ChainError(f"reverted with unknown error 0x{data.hex()[:72]}")
    name, types = known
    args = tuple(_fmt(v, t) for v, t in zip(decode(types, body), types))
    template = _TEMPLATES.get(name)
    message = template(args) if template else f"{name}({', '.join(map(str, args))})"
    return ChainError(f"{name}: {message}", name, args)
