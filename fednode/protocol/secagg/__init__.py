"""Secure aggregation (Bonawitz et al., with every key bound to an on-chain identity): each hospital publishes its
update masked with pairwise masks (from X25519 keys registered in the model cards it joined with) and a self
mask, plus Shamir shares of every mask seed encrypted to the other hospitals; once the aggregator fixes the
survivors on-chain, the hospitals reveal exactly the shares that remove the survivors' masks, and anyone can
re-derive the unmasked sum, an integer computation, bit for bit.

- `keys.py`     key derivation from the wallet, the signed key registration, the HKDF-derived seeds
- `masking.py`  the rules' parameters, fixed-point quantization, ChaCha20 mask streams, modular sums
- `shares.py`   the share, survivors and reveal documents, Shamir sharing over GF(2^128) (pycryptodome)
- `unmask.py`   the unmasked sum of a round, from its masked updates and revealed shares alone
"""
