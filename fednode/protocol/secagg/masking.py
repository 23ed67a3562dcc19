"""Fixed-point masking. An update's weighted delta is clipped elementwise to [-clip, clip], scaled by
2^scale_bits, rounded to integers and multiplied by its integer merge weight; masks are ChaCha20 keystreams read
as little-endian uint64 and added modulo 2^64. Integer sums are exact and associative, so the unmasked sum is the
same on any machine and in any order. Written with numpy's wrapping uint64 arithmetic for that reason."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from ...tables import from_table

EXACT_BITS = 53  # |sum| below 2^53 converts to float64 exactly


class SecureAggregationError(ValueError):
    """Secure-aggregation parameters, documents or shares that cannot be used."""


@dataclass(frozen=True)
class SecureSettings:
    """The rules' `secure_aggregation` table."""

    threshold: float = 0.6   # shares needed to rebuild a secret, as a fraction of the round's participants (> 1/2)
    clip: float = 1.0        # every element of an update's delta is clipped to [-clip, clip]
    scale_bits: int = 20     # fixed point: a delta x is sent as round(x * 2^scale_bits)

    def __post_init__(self):
        def number(v) -> bool:
            return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

        if not number(self.threshold) or not 0.5 < self.threshold <= 1:
            raise SecureAggregationError(f"threshold must be in (0.5, 1], got {self.threshold!r}")
        if not number(self.clip) or self.clip <= 0:
            raise SecureAggregationError(f"clip must be a finite number > 0, got {self.clip!r}")
        if isinstance(self.scale_bits, bool) or not isinstance(self.scale_bits, int) or not 4 <= self.scale_bits <= 40:
            raise SecureAggregationError(f"scale_bits must be a whole number in [4, 40], got {self.scale_bits!r}")

    @classmethod
    def from_rules(cls, table: dict) -> SecureSettings | None:
        return from_table(cls, table, "secure_aggregation", SecureAggregationError) if table != {} else None

    def shares_needed(self, participants: int) -> int:
        """t: more than half of the round's participants, and at least `threshold` of them."""
        return min(participants, max(participants // 2 + 1, math.ceil(self.threshold * participants - 1e-9)))

    def max_total_weight(self) -> int:
        """The largest total merge weight whose sum stays exact: W * clip * 2^scale_bits < 2^53."""
        return int(2 ** EXACT_BITS / (self.clip * 2 ** self.scale_bits)) - 1

    @property
    def quantization_error(self) -> float:
        """The largest error rounding adds to an element of the mean delta (half a step)."""
        return 0.5 / 2 ** self.scale_bits


def flat_names(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(state)


def quantize(state: dict[str, torch.Tensor], start: dict[str, torch.Tensor], settings: SecureSettings,
             weight: int) -> np.ndarray:
    """weight * round(clip(state - start) * 2^scale_bits) of every element, tensors in sorted-name order, as
    uint64 (two's complement)."""
    parts = []
    for key in flat_names(start):
        delta = (state[key].to(torch.float64) - start[key].to(torch.float64)).clamp(-settings.clip, settings.clip)
        parts.append(torch.round(delta * 2.0 ** settings.scale_bits).to(torch.int64).reshape(-1).numpy())
    q = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return (q * np.int64(weight)).view(np.uint64)


def stream(seed: bytes, size: int) -> np.ndarray:
    """`size` uint64 words of the ChaCha20 keystream keyed by a 256-bit seed (nonce 0: each seed is used once)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * size)), dtype="<u8").astype(np.uint64, copy=False)


def pair_sign(own: str, peer: str) -> int:
    """+1 if `own` adds the pair's mask, -1 if it subtracts it: the masks of two survivors cancel in the sum."""
    return 1 if own.lower() < peer.lower() else -1


def apply_mask(values: np.ndarray, seed: bytes, sign: int) -> np.ndarray:
    """values + sign * stream(seed) modulo 2^64."""
    mask = stream(seed, values.size)
    return values + mask if sign > 0 else values - mask


def to_state(flat: np.ndarray, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat uint64 vector into int64 tensors shaped like `like` (sorted-name order)."""
    out, offset = {}, 0
    for key in flat_names(like):
        n = like[key].numel()
        out[key] = torch.from_numpy(flat[offset:offset + n].view(np.int64).copy()).reshape(like[key].shape)
        offset += n
    return out


def from_state(state: dict[str, torch.Tensor]) -> np.ndarray:
    """The inverse of `to_state`: int64 tensors as one flat uint64 vector."""
    return np.concatenate([state[k].reshape(-1).numpy().view(np.uint64) for k in flat_names(state)])


def dequantize(total: np.ndarray, weight: int, settings: SecureSettings, start: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """start + sum / (weight * 2^scale_bits) in float64: the weighted mean of the quantized deltas added to the
    start adapter (the int64 -> float64 conversion is exact below 2^53, the division correctly rounded)."""
    mean = torch.from_numpy(total.view(np.int64).astype(np.float64)) / (float(weight) * 2.0 ** settings.scale_bits)
    out, offset = {}, 0
    for key in flat_names(start):
        n = start[key].numel()
        out[key] = start[key].to(torch.float64) + mean[offset:offset + n].reshape(start[key].shape)
        offset += n
    return out


def merge_weight(weighting: str, num_samples: int) -> int:
    """The integer an update's quantized delta is multiplied by before masking: its samples, or 1 (uniform)."""
    return num_samples if weighting == "num_samples" else 1
