// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";

/// @title UpdateSignatures
/// @notice EIP-712 signatures of hospitals over their updates, so that anyone (in practice the aggregator) can relay
/// an update a hospital signed without holding ether itself. The typed data is
/// `Update(address federation,uint256 round,bytes32 cidDigest,bytes32 fileSha256,uint64 numSamples,bytes32
/// metricsDigest)` in the domain (name "fedchain Federation", version "1", chain id, this contract), so a
/// signature is good for one round of one federation on one chain only.
abstract contract UpdateSignatures is EIP712 {
    /// @notice One relayed update: the fields the node signed, the node it names and its signature (v, r, s).
    struct SignedUpdate {
        address node;
        bytes32 cidDigest;
        bytes32 fileSha256;
        uint64 numSamples;
        bytes32 metricsDigest;
        uint8 v;
        bytes32 r;
        bytes32 s;
    }

    bytes32 public constant UPDATE_TYPEHASH = keccak256(
        "Update(address federation,uint256 round,bytes32 cidDigest,bytes32 fileSha256,uint64 numSamples,"
        "bytes32 metricsDigest)"
    );

    /// @notice The signature recovers to no address (v not 27 or 28, or r not on the curve).
    error InvalidSignature(address node);
    /// @notice The signature's s is in the upper half of the curve order: a malleated copy of a valid signature.
    error MalleatedSignature(address node, bytes32 s);
    /// @notice The signature is valid but not by `node` over these fields, this round, federation and chain.
    error WrongSigner(address node, address signer);

    constructor() EIP712("fedchain Federation", "1") {}

    /// @notice The EIP-712 digest a node signs for its update to round `roundId`.
    function updateDigest(
        uint256 roundId,
        bytes32 cidDigest,
        bytes32 fileSha256,
        uint64 numSamples,
        bytes32 metricsDigest
    ) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(
                abi.encode(UPDATE_TYPEHASH, address(this), roundId, cidDigest, fileSha256, numSamples, metricsDigest)
            )
        );
    }

    /// @dev Reverts unless `u` carries `u.node`'s own signature of its fields for round `roundId`.
    function _checkSignature(uint256 roundId, SignedUpdate calldata u) internal view {
        bytes32 digest = updateDigest(roundId, u.cidDigest, u.fileSha256, u.numSamples, u.metricsDigest);
        (address signer, ECDSA.RecoverError error,) = ECDSA.tryRecover(digest, u.v, u.r, u.s);
        if (error == ECDSA.RecoverError.InvalidSignatureS) revert MalleatedSignature(u.node, u.s);
        if (error != ECDSA.RecoverError.NoError) revert InvalidSignature(u.node);
        if (signer != u.node) revert WrongSigner(u.node, signer);
    }
}
