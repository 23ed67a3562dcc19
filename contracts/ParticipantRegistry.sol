// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {AccessControlDefaultAdminRules} from
    "@openzeppelin/contracts/access/extensions/AccessControlDefaultAdminRules.sol";

/// @title ParticipantRegistry
/// @notice The identity of every model taking part in a federation. A node joins with its wallet, naming its
/// model identity (digest of base-model identity + adapter config) and a metadata digest (e.g. the CID digest of
/// a JSON model card). An admin approves it; an admin can revoke it. Revocation bars later submissions and stays
/// in history: the events are the audit log, the stored record keeps the block numbers.
/// @dev Roles: DEFAULT_ADMIN_ROLE (one admin, handed over in two steps after a delay: OpenZeppelin's
/// AccessControlDefaultAdminRules), AGGREGATOR_ROLE (aggregator); "node" is a participant whose status is Approved.
/// Abstract: deployed as part of `Federation`, so a submission checks its sender without an external call.
abstract contract ParticipantRegistry is AccessControlDefaultAdminRules {
    bytes32 public constant AGGREGATOR_ROLE = keccak256("AGGREGATOR_ROLE");

    enum Status {
        None,
        Pending,
        Approved,
        Revoked
    }

    struct Participant {
        bytes32 modelId;
        bytes32 metadataDigest;
        Status status;
        uint64 joinedBlock;
        uint64 approvedBlock;
        uint64 revokedBlock;
    }

    mapping(address node => Participant) private _participants;

    error ZeroModelId();
    error AlreadyJoined(address node, Status status);
    error NotPending(address node, Status status);
    error NotApproved(address node, Status status);

    event Joined(address indexed node, bytes32 indexed modelId, bytes32 metadataDigest);
    event Approved(address indexed node, address indexed admin);
    event Revoked(address indexed node, address indexed admin, uint8 reason);

    /// @param adminDelay seconds between starting an admin transfer and the new admin accepting it.
    constructor(address admin, uint48 adminDelay) AccessControlDefaultAdminRules(adminDelay, admin) {}

    /// @notice Ask to take part with the caller's wallet.
    function join(bytes32 modelId, bytes32 metadataDigest) external {
        if (modelId == bytes32(0)) revert ZeroModelId();
        Participant storage p = _participants[msg.sender];
        if (p.status != Status.None) revert AlreadyJoined(msg.sender, p.status);
        p.modelId = modelId;
        p.metadataDigest = metadataDigest;
        p.status = Status.Pending;
        p.joinedBlock = uint64(block.number);
        emit Joined(msg.sender, modelId, metadataDigest);
    }

    function approve(address node) external onlyRole(DEFAULT_ADMIN_ROLE) {
        Participant storage p = _participants[node];
        if (p.status != Status.Pending) revert NotPending(node, p.status);
        p.status = Status.Approved;
        p.approvedBlock = uint64(block.number);
        emit Approved(node, msg.sender);
    }

    /// @param reason an application-defined code (e.g. 1 = misbehaviour, 2 = left the federation).
    function revoke(address node, uint8 reason) external onlyRole(DEFAULT_ADMIN_ROLE) {
        Participant storage p = _participants[node];
        if (p.status != Status.Approved && p.status != Status.Pending) revert NotApproved(node, p.status);
        p.status = Status.Revoked;
        p.revokedBlock = uint64(block.number);
        emit Revoked(node, msg.sender, reason);
    }

    function participant(address node) external view returns (Participant memory) {
        return _participants[node];
    }

    function statusOf(address node) public view returns (Status) {
        return _participants[node].status;
    }
}
