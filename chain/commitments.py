"""The commitments the Federation contract stores, recomputed off-chain exactly as the contract hashes them."""
from __future__ import annotations

from eth_abi import encode as abi_encode
from web3 import Web3


def submission_commitment(index: int, cid_digest: bytes, file_sha256: bytes, num_samples: int,
                          metrics_digest: bytes) -> bytes:
    """submissionOf[round][node]: keccak256(abi.encode(index, cidDigest, fileSha256, numSamples, metricsDigest))."""
    return Web3.keccak(abi_encode(["uint32", "bytes32", "bytes32", "uint64", "bytes32"],
                                  [index, cid_digest, file_sha256, num_samples, metrics_digest]))


def result_commitment(cid_digest: bytes, file_sha256: bytes, verdicts: bytes) -> bytes:
    """resultOf[round]: keccak256(abi.encode(cidDigest, fileSha256, keccak256(verdicts)))."""
    return Web3.keccak(abi_encode(["bytes32", "bytes32", "bytes32"], [cid_digest, file_sha256, Web3.keccak(verdicts)]))
