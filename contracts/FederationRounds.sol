// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {ParticipantRegistry} from "./ParticipantRegistry.sol";
import {UpdateSignatures} from "./UpdateSignatures.sol";

/// @title FederationRounds
/// @notice The round state machine of one federation. A coordinator registers the initial adapter and the rules
/// once (`configure`); only an admin changes the rules later (`changeRules`). Every round opens from the last
/// finalized global adapter (the initial one for round 1) under the federation's rules, with a deadline and a
/// quorum; approved nodes submit one update each, directly or signed and relayed in batches (`submitSignedBatch`);
/// the aggregator finalizes with the new global adapter and a verdict for every submission (0 = merged, any other
/// value = the reason code it was rejected for). Gas per call is constant in the number of participants: the
/// verdicts are one byte per submission, counted word by word.
abstract contract FederationRounds is ParticipantRegistry, UpdateSignatures {
    enum RoundState {
        None,
        Open,
        Finalized,
        Cancelled
    }

    /// @dev One storage slot.
    struct Round {
        uint64 deadline;
        uint32 minUpdates;
        uint32 submissions;
        uint32 accepted;
        RoundState state;
        bool allowBelowQuorum;
        bool submissionsClosed; // set when the round's masks are being removed (SecureAggregation)
    }

    /// @notice The adapter the next round must start from: the last finalized global adapter, else the initial one.
    struct Adapter {
        bytes32 cidDigest;
        bytes32 fileSha256;
    }

    uint256 public roundCount;
    Adapter public lineageHead;
    /// @notice sha256 of the canonical JSON rules every round opens under (zero until `configure`).
    bytes32 public rulesDigest;
    mapping(uint256 roundId => Round) private _rounds;
    /// @notice keccak256(abi.encode(index, cidDigest, fileSha256, numSamples, metricsDigest)) of each submission.
    mapping(uint256 roundId => mapping(address node => bytes32)) public submissionOf;
    /// @notice keccak256(abi.encode(cidDigest, fileSha256, keccak256(verdicts))) of each finalized round.
    mapping(uint256 roundId => bytes32) public resultOf;

    /// @notice Only the aggregator may finalize a round.
    error NotAggregator(address account);
    /// @notice Only the aggregator or an admin may open or cancel a round.
    error NotCoordinator(address account);
    error NotParticipant(address node, Status status);
    error UnknownRound(uint256 roundId);
    error RoundNotOpen(uint256 roundId, RoundState state);
    error PreviousRoundOpen(uint256 roundId);
    error InvalidDeadline(uint64 deadline, uint256 nowTimestamp);
    error InvalidQuorum();
    error ZeroDigest();
    /// @notice The initial adapter and rules are registered once, before round 1.
    error AlreadyConfigured();
    /// @notice No round opens, and no rules change, before the initial adapter and rules are registered.
    error NotConfigured();
    /// @notice A round must start from `expectedCid` / `expectedSha256`, the last finalized global adapter.
    error LineageBroken(bytes32 expectedCid, bytes32 expectedSha256, bytes32 cidDigest, bytes32 fileSha256);
    /// @notice A round must open under the federation's rules `expected`; an admin changes them first.
    error RulesMismatch(bytes32 expected, bytes32 rulesDigest);
    error ZeroSamples();
    error DeadlinePassed(uint256 roundId, uint64 deadline, uint256 nowTimestamp);
    error DeadlineNotPassed(uint256 roundId, uint64 deadline);
    error AlreadySubmitted(uint256 roundId, address node);
    /// @notice The round takes no more submissions: its survivors were fixed to remove their masks.
    error SubmissionsClosed(uint256 roundId);
    error VerdictCountMismatch(uint256 roundId, uint256 submissions, uint256 verdicts);
    error QuorumNotReached(uint256 roundId, uint256 accepted, uint256 minUpdates);

    event Configured(address indexed by, bytes32 cidDigest, bytes32 fileSha256, bytes32 rulesDigest);
    event RulesChanged(address indexed admin, bytes32 previousDigest, bytes32 rulesDigest);
    event RoundOpened(
        uint256 indexed roundId,
        address indexed opener,
        bytes32 baseCidDigest,
        bytes32 baseSha256,
        bytes32 rulesDigest,
        uint64 deadline,
        uint32 minUpdates,
        bool allowBelowQuorum
    );
    event UpdateSubmitted(
        uint256 indexed roundId,
        address indexed node,
        uint32 index,
        bytes32 cidDigest,
        bytes32 fileSha256,
        uint64 numSamples,
        bytes32 metricsDigest
    );
    event RoundFinalized(
        uint256 indexed roundId,
        address indexed aggregator,
        bytes32 cidDigest,
        bytes32 fileSha256,
        uint32 accepted,
        bytes verdicts
    );
    event RoundCancelled(uint256 indexed roundId, address indexed by);

    /// @dev The aggregator or an admin.
    modifier onlyCoordinator() {
        _checkCoordinator();
        _;
    }

    modifier onlyAggregator() {
        if (!hasRole(AGGREGATOR_ROLE, msg.sender)) revert NotAggregator(msg.sender);
        _;
    }

    /// @notice Register the adapter round 1 starts from and the federation's rules; once, before round 1.
    /// @param rules sha256 of the canonical JSON rules (aggregation rule, parameters, privacy parameters).
    function configure(bytes32 cidDigest, bytes32 fileSha256, bytes32 rules) external onlyCoordinator {
        if (rulesDigest != bytes32(0)) revert AlreadyConfigured();
        if (cidDigest == bytes32(0) || fileSha256 == bytes32(0) || rules == bytes32(0)) revert ZeroDigest();
        lineageHead = Adapter(cidDigest, fileSha256);
        rulesDigest = rules;
        emit Configured(msg.sender, cidDigest, fileSha256, rules);
    }

    /// @notice Change the rules the following rounds open under (a round already open keeps its own).
    function changeRules(bytes32 rules) external onlyRole(DEFAULT_ADMIN_ROLE) {
        bytes32 previous = rulesDigest;
        if (previous == bytes32(0)) revert NotConfigured();
        if (rules == bytes32(0)) revert ZeroDigest();
        rulesDigest = rules;
        emit RulesChanged(msg.sender, previous, rules);
    }

    /// @notice Open the next round. Rounds run one at a time, in order, each from the lineage head under the
    /// federation's rules; both are named again here so that the opener states what it starts from.
    function openRound(
        bytes32 baseCidDigest,
        bytes32 baseSha256,
        bytes32 rules,
        uint64 deadline,
        uint32 minUpdates,
        bool allowBelowQuorum
    ) external onlyCoordinator returns (uint256 roundId) {
        bytes32 expectedRules = rulesDigest;
        if (expectedRules == bytes32(0)) revert NotConfigured();
        if (rules != expectedRules) revert RulesMismatch(expectedRules, rules);
        Adapter memory head = lineageHead;
        if (baseCidDigest != head.cidDigest || baseSha256 != head.fileSha256) {
            revert LineageBroken(head.cidDigest, head.fileSha256, baseCidDigest, baseSha256);
        }
        if (deadline <= block.timestamp) revert InvalidDeadline(deadline, block.timestamp);
        if (minUpdates == 0) revert InvalidQuorum();
        uint256 previous = roundCount;
        if (previous != 0 && _rounds[previous].state == RoundState.Open) revert PreviousRoundOpen(previous);
        roundId = previous + 1;
        roundCount = roundId;
        _rounds[roundId] = Round({
            deadline: deadline,
            minUpdates: minUpdates,
            submissions: 0,
            accepted: 0,
            state: RoundState.Open,
            allowBelowQuorum: allowBelowQuorum,
            submissionsClosed: false
        });
        emit RoundOpened(roundId, msg.sender, baseCidDigest, baseSha256, rules, deadline, minUpdates, allowBelowQuorum);
    }

    /// @notice Record the caller's update for an open round: at most one per node per round, before the deadline.
    function submitUpdate(
        uint256 roundId,
        bytes32 cidDigest,
        bytes32 fileSha256,
        uint64 numSamples,
        bytes32 metricsDigest
    ) external {
        Round storage r = _submittable(roundId);
        uint32 index = r.submissions;
        _record(roundId, msg.sender, index, cidDigest, fileSha256, numSamples, metricsDigest);
        r.submissions = index + 1;
    }

    /// @notice Record updates that their nodes signed (EIP-712 `Update`), relayed by anyone, in one transaction.
    /// Each is checked exactly as a direct submission of its node, after its signature; one bad update reverts all.
    function submitSignedBatch(uint256 roundId, SignedUpdate[] calldata updates) external {
        Round storage r = _submittable(roundId);
        uint32 index = r.submissions;
        for (uint256 i = 0; i < updates.length; ++i) {
            SignedUpdate calldata u = updates[i];
            _checkSignature(roundId, u);
            _record(roundId, u.node, index, u.cidDigest, u.fileSha256, u.numSamples, u.metricsDigest);
            unchecked {
                ++index;
            }
        }
        r.submissions = index;
    }

    /// @notice Close a round with its new global adapter.
    /// @param verdicts one byte per submission, in submission order: 0 = merged, otherwise the rejection reason.
    function finalize(uint256 roundId, bytes32 cidDigest, bytes32 fileSha256, bytes calldata verdicts)
        external
        onlyAggregator
    {
        Round storage r = _openRound(roundId);
        if (cidDigest == bytes32(0) || fileSha256 == bytes32(0)) revert ZeroDigest();
        if (verdicts.length != r.submissions) revert VerdictCountMismatch(roundId, r.submissions, verdicts.length);
        uint256 accepted = _countZeroBytes(verdicts);
        if (accepted == 0 || (accepted < r.minUpdates && !(r.allowBelowQuorum && block.timestamp > r.deadline))) {
            revert QuorumNotReached(roundId, accepted, r.minUpdates);
        }
        r.state = RoundState.Finalized;
        r.accepted = uint32(accepted);
        lineageHead = Adapter(cidDigest, fileSha256);
        resultOf[roundId] = keccak256(abi.encode(cidDigest, fileSha256, keccak256(verdicts)));
        emit RoundFinalized(roundId, msg.sender, cidDigest, fileSha256, uint32(accepted), verdicts);
    }

    /// @notice Give up a round whose deadline passed without a result; the next round can then be opened.
    function cancelRound(uint256 roundId) external onlyCoordinator {
        Round storage r = _openRound(roundId);
        if (block.timestamp <= r.deadline) revert DeadlineNotPassed(roundId, r.deadline);
        r.state = RoundState.Cancelled;
        emit RoundCancelled(roundId, msg.sender);
    }

    function getRound(uint256 roundId) external view returns (Round memory) {
        return _rounds[roundId];
    }

    function _checkCoordinator() internal view {
        if (!hasRole(AGGREGATOR_ROLE, msg.sender) && !hasRole(DEFAULT_ADMIN_ROLE, msg.sender)) {
            revert NotCoordinator(msg.sender);
        }
    }

    /// @dev Close an open round to further submissions (once).
    function _closeSubmissions(uint256 roundId) internal {
        Round storage r = _openRound(roundId);
        if (r.submissionsClosed) revert SubmissionsClosed(roundId);
        r.submissionsClosed = true;
    }

    /// @dev Round `roundId`, open, before its deadline and not closed for unmasking.
    function _submittable(uint256 roundId) private view returns (Round storage r) {
        r = _openRound(roundId);
        if (block.timestamp > r.deadline) revert DeadlinePassed(roundId, r.deadline, block.timestamp);
        if (r.submissionsClosed) revert SubmissionsClosed(roundId);
    }

    /// @dev Record update number `index` of `node` to round `roundId`: an approved node's first update of the round.
    function _record(
        uint256 roundId,
        address node,
        uint32 index,
        bytes32 cidDigest,
        bytes32 fileSha256,
        uint64 numSamples,
        bytes32 metricsDigest
    ) private {
        Status status = statusOf(node);
        if (status != Status.Approved) revert NotParticipant(node, status);
        if (cidDigest == bytes32(0) || fileSha256 == bytes32(0)) revert ZeroDigest();
        if (numSamples == 0) revert ZeroSamples();
        if (submissionOf[roundId][node] != bytes32(0)) revert AlreadySubmitted(roundId, node);
        submissionOf[roundId][node] = keccak256(abi.encode(index, cidDigest, fileSha256, numSamples, metricsDigest));
        emit UpdateSubmitted(roundId, node, index, cidDigest, fileSha256, numSamples, metricsDigest);
    }

    /// @dev Round `roundId`, which must be open (UnknownRound / RoundNotOpen otherwise).
    function _openRound(uint256 roundId) internal view returns (Round storage r) {
        r = _rounds[roundId];
        if (r.state != RoundState.Open) {
            if (r.state == RoundState.None) revert UnknownRound(roundId);
            revert RoundNotOpen(roundId, r.state);
        }
    }

    /// @dev Number of zero bytes in `data`, 32 bytes at a time (SWAR), so the cost grows by one step per 32
    /// submissions rather than one per submission.
    function _countZeroBytes(bytes calldata data) private pure returns (uint256 zeros) {
        uint256 lows = 0x0101010101010101010101010101010101010101010101010101010101010101;
        uint256 highs = lows << 7;
        uint256 len = data.length;
        for (uint256 offset = 0; offset < len; offset += 32) {
            uint256 word;
            assembly {
                word := calldataload(add(data.offset, offset))
            }
            uint256 remaining = len - offset;
            if (remaining < 32) {
                // Bytes past the end read as zero: make them non-zero so they are not counted.
                word |= lows >> (remaining * 8);
            }
            unchecked {
                // A byte is zero iff neither its low seven bits nor its top bit are set.
                uint256 nonzero = (((word & ~highs) + ~highs) | word) & highs;
                zeros += (((nonzero ^ highs) >> 7) * lows) >> 248;
            }
        }
    }
}
