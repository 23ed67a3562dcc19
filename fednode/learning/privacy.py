"""Hospital-level differential privacy: clip a hospital's whole update, add Gaussian noise, account for it. What it
protects is the hospital's dataset as a whole (any change to it, one patient or all); record-level DP, which
protects each patient record, is DP-SGD inside local training (fednode.learning.dp_sgd).

Each hospital privatizes its own update before publishing it, so the aggregator's merge stays deterministic and
auditable. The update delta = update - start is scaled onto the L2 ball of radius C (the clip norm) and every
coordinate gets N(0, (sigma * C)^2) noise. Any two datasets of a hospital give clipped deltas at most 2C apart, so
the release is a Gaussian mechanism with noise multiplier sigma / 2 relative to its sensitivity, whatever changed
in the data (one patient or all of them). The accountant composes that over rounds with dp_accounting.

The noise seed is secret to the node; only its sha256 goes into the published metrics, so the hospital can later
prove which noise it used by revealing the seed.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

from ..tables import from_table

MECHANISMS = ("hospital", "gaussian")  # "gaussian" is what rules version 1 called hospital-level DP
RECORD_MECHANISM = "dp_sgd"
SEED_POLICIES = ("wallet", "random")  # wallet: derived from a wallet signature (reproducible); random: os.urandom
SENSITIVITY = 2.0  # L2 distance between two clipped deltas, in units of the clip norm
SEED_BYTES = 32


class PrivacyError(ValueError):
    """Privacy settings or inputs that cannot be applied."""


@dataclass(frozen=True)
class DPSettings:
    clip_norm: float                # C: L2 bound on the whole adapter's delta
    noise_multiplier: float         # sigma: noise std per coordinate is sigma * C
    delta: float                    # the delta at which epsilon is reported
    mechanism: str = "hospital"
    sampling_rate: float = 1.0      # q: Poisson rate at which hospitals take part in a round; < 1 amplifies only
    # against someone who cannot see who took part (submissions are public on-chain)
    noise_seed: str = "wallet"      # seed policy, one of SEED_POLICIES

    def __post_init__(self):
        if self.mechanism not in MECHANISMS:
            raise PrivacyError(f"unknown privacy mechanism {self.mechanism!r}; known: none, hospital, "
                               f"{RECORD_MECHANISM}")
        for name in ("clip_norm", "noise_multiplier", "delta", "sampling_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PrivacyError(f"{name} must be a finite number, got {value!r}")
        if not self.clip_norm > 0:
            raise PrivacyError(f"clip_norm must be > 0, got {self.clip_norm}")
        if not self.noise_multiplier > 0:
            raise PrivacyError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {self.delta}")
        if not 0 < self.sampling_rate <= 1:
            raise PrivacyError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if self.noise_seed not in SEED_POLICIES:
            raise PrivacyError(f"noise_seed must be one of {', '.join(SEED_POLICIES)}, got {self.noise_seed!r}")

    @classmethod
    def from_rules(cls, privacy: Mapping) -> DPSettings | None:
        """The hospital-level settings a rules' `privacy` object names; None when privacy is off (`{}` or mechanism
        "none") or record-level (mechanism "dp_sgd")."""
        if not isinstance(privacy, Mapping):
            raise PrivacyError(f"privacy must be an object, got {type(privacy).__name__}")
        if not privacy:
            return None
        if "mechanism" not in privacy:
            raise PrivacyError(f"privacy needs a mechanism (none, hospital or {RECORD_MECHANISM})")
        if privacy["mechanism"] == RECORD_MECHANISM:
            return None
        if privacy["mechanism"] == "none":
            if len(privacy) > 1:
                raise PrivacyError(f"mechanism 'none' takes no parameters, got {sorted(set(privacy) - {'mechanism'})}")
            return None
        return settings_from(cls, privacy, "privacy")

    def to_json(self) -> dict:
        return asdict(self)


def clip_update(update: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
                clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """(delta scaled onto the L2 ball of radius clip_norm, in float64; the delta's norm before clipping). The norm
    is taken over the whole adapter, accumulated in float64 in sorted-name order."""
    keys = sorted(start)
    if sorted(update) != keys:
        raise PrivacyError("the update and its start adapter hold different tensors")
    delta = {k: update[k].to(torch.float64) - start[k].to(torch.float64) for k in keys}
    norm = math.sqrt(sum(float(torch.sum(delta[k] ** 2)) for k in keys))
    scale = clip_norm / norm if norm > clip_norm else 1.0
    return {k: delta[k] * scale for k in keys}, norm


def clip_and_noise(update: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], settings: DPSettings,
                   seed: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """start + clip(update - start) + N(0, (sigma C)^2) per coordinate, in float32; the noise is drawn in sorted-name
    order from a generator seeded with the (secret) seed, so the same seed gives bit-identical output.
    Returns the new state and {pre_clip_norm, clipped, noise_std}."""
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise PrivacyError(f"the noise seed must be {SEED_BYTES} bytes")
    clipped, norm = clip_update(update, start, settings.clip_norm)
    std = settings.noise_multiplier * settings.clip_norm
    gen = torch.Generator().manual_seed(int.from_bytes(seed[:8], "little"))
    noised = {}
    for key in sorted(clipped):
        noise = torch.randn(clipped[key].shape, generator=gen, dtype=torch.float64) * std
        noised[key] = (start[key].to(torch.float64) + clipped[key] + noise).to(torch.float32)
    return noised, {"pre_clip_norm": norm, "clipped": norm > settings.clip_norm, "noise_std": std}


def wallet_noise_seed(account: LocalAccount, federation_id: str, round_id: int) -> bytes:
    """A per-round seed only the wallet's holder can compute: sha256 of its (deterministic, RFC 6979) signature of a
    message naming the federation, round and node. Reproducible by the hospital, unguessable for anyone else."""
    message = f"fedchain DP noise seed\nfederation: {federation_id}\nround: {round_id}\nnode: {account.address}"
    return hashlib.sha256(bytes(account.sign_message(encode_defunct(text=message)).signature)).digest()


def noise_seed(policy: str, account: LocalAccount, federation_id: str, round_id: int) -> bytes:
    """The round's secret noise seed under a SEED_POLICIES policy: the wallet's (reproducible) or fresh random."""
    return wallet_noise_seed(account, federation_id, round_id) if policy == "wallet" else os.urandom(SEED_BYTES)


def seed_commitment(seed: bytes) -> str:
    """Hex sha256 of the seed: what the published metrics carry instead of the seed."""
    return hashlib.sha256(seed).hexdigest()


def dp_event(settings: DPSettings, rounds: int):
    """The dp_accounting event of `rounds` rounds: a Poisson-sampled Gaussian with noise multiplier
    sigma / SENSITIVITY, self-composed."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PrivacyError(f"rounds must be an integer >= 1, got {rounds!r}")
    return sampled_gaussian(settings.sampling_rate, settings.noise_multiplier / SENSITIVITY, rounds)


def sampled_gaussian(q: float, sigma: float, count: int):
    """The dp_accounting event of `count` Poisson-sampled (rate q) Gaussian steps of noise multiplier sigma."""
    from dp_accounting import dp_event as events  # imported here: dp_accounting takes ~1.5 s to import

    return events.SelfComposedDpEvent(events.PoissonSampledDpEvent(q, events.GaussianDpEvent(sigma)), count)


PLD_MIN_NOISE = 0.2  # ~1 GB and ~14 s at 0.2


def epsilon(settings: DPSettings, rounds: int, delta: float | None = None, accountant: str = "rdp") -> float:
    """Epsilon after `rounds` rounds at `delta` (default: the settings' delta), by Renyi DP ("rdp", dp_accounting's
    default orders) or privacy loss distributions ("pld": tighter, ~0.1-15 s; its discretised loss grows as
    1/sigma^2, so it is refused below PLD_MIN_NOISE, where it would need gigabytes)."""
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    classes = {"rdp": RdpAccountant, "pld": PLDAccountant}
    if accountant not in classes:
        raise PrivacyError(f"unknown accountant {accountant!r}; known: {', '.join(classes)}")
    delta = settings.delta if delta is None else delta
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    if accountant == "pld" and settings.noise_multiplier < PLD_MIN_NOISE:
        raise PrivacyError(f"the pld accountant needs noise_multiplier >= {PLD_MIN_NOISE}, got "
                           f"{settings.noise_multiplier:g}; use the rdp accountant")
    acc = classes[accountant]()
    acc.compose(dp_event(settings, rounds))
    return float(acc.get_epsilon(delta))


def privatize(update: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], settings: DPSettings,
              account: LocalAccount, federation_id: str, round_id: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A node's DP step for one round: the noised state and the metrics to publish with it (settings, clipping,
    RDP epsilon after `round_id` rounds at the settings' delta, and the noise seed's commitment)."""
    seed = noise_seed(settings.noise_seed, account, federation_id, round_id)
    state, info = clip_and_noise(update, start, settings, seed)
    return state, {**settings.to_json(), **info, "accountant": "rdp", "rounds": round_id,
                   "epsilon": epsilon(settings, round_id), "noise_seed_sha256": seed_commitment(seed)}


def settings_from(cls: type, privacy: Mapping, what: str):
    """Dataclass `cls` built from a rules' `privacy` object, naming the first unknown or missing parameter."""
    return from_table(cls, privacy, what, PrivacyError)
