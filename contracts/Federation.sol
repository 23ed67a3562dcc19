// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {ParticipantRegistry} from "./ParticipantRegistry.sol";
import {SecureAggregation} from "./SecureAggregation.sol";

/// @title Federation
/// @notice One federation on one address: the participant registry (identities, approval, revocation) and the
/// round state machine (configure, open, submit directly or signed and relayed, finalize, cancel), and the
/// unmasking phase of securely aggregated rounds. Its events are the complete audit log.
contract Federation is SecureAggregation {
    constructor(address admin, uint48 adminDelay) ParticipantRegistry(admin, adminDelay) {}
}
