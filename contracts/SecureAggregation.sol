// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {FederationRounds} from "./FederationRounds.sol";

/// @title SecureAggregation
/// @notice The unmasking phase of a round whose updates are masked (pairwise + self masks, Bonawitz et al.): the
/// aggregator fixes the survivors (the updates it will sum) and closes the round to submissions; then each
/// participant publishes, once, the Shamir shares it holds that remove the survivors' masks. Which shares an
/// honest participant reveals follows from the survivors alone, so the aggregator can never obtain both the self
/// mask and the pairwise masks of one update. Both digests name documents in storage; the events are the log the
/// audit re-derives the unmasked sum from.
abstract contract SecureAggregation is FederationRounds {
    /// @notice sha256 of the survivors document of each round whose masks are being removed.
    mapping(uint256 roundId => bytes32) public survivorsOf;
    /// @notice sha256 of the reveal document each participant published for a round.
    mapping(uint256 roundId => mapping(address node => bytes32)) public revealOf;

    /// @notice Shares are revealed only once the round's survivors are fixed.
    error UnmaskNotRequested(uint256 roundId);
    error AlreadyRevealed(uint256 roundId, address node);

    event UnmaskRequested(uint256 indexed roundId, address indexed aggregator, bytes32 survivorsDigest);
    event SharesRevealed(uint256 indexed roundId, address indexed node, bytes32 revealDigest);

    /// @notice Fix round `roundId`'s survivors (the updates that will be summed) and close it to submissions.
    function requestUnmask(uint256 roundId, bytes32 survivorsDigest) external onlyAggregator {
        if (survivorsDigest == bytes32(0)) revert ZeroDigest();
        _closeSubmissions(roundId);
        survivorsOf[roundId] = survivorsDigest;
        emit UnmaskRequested(roundId, msg.sender, survivorsDigest);
    }

    /// @notice Record the caller's reveal document for a round being unmasked (approved participants, once).
    function revealShares(uint256 roundId, bytes32 revealDigest) external {
        _openRound(roundId);
        if (survivorsOf[roundId] == bytes32(0)) revert UnmaskNotRequested(roundId);
        Status status = statusOf(msg.sender);
        if (status != Status.Approved) revert NotParticipant(msg.sender, status);
        if (revealDigest == bytes32(0)) revert ZeroDigest();
        if (revealOf[roundId][msg.sender] != bytes32(0)) revert AlreadyRevealed(roundId, msg.sender);
        revealOf[roundId][msg.sender] = revealDigest;
        emit SharesRevealed(roundId, msg.sender, revealDigest);
    }
}
