"""Record-level differential privacy: DP-SGD inside each hospital (Abadi et al. 2016). Every optimizer step draws a
Poisson sample of the hospital's records (rate q = batch_size / training-set size), clips each record's gradient
of the trainable adapter parameters to `max_grad_norm`, sums, adds Gaussian noise of std
noise_multiplier * max_grad_norm per coordinate and divides by the expected batch size. What leaves the hospital
(every update of every round) is then (epsilon, delta)-DP with respect to any single patient record; the
accountant (dp_accounting's RDP) composes the sampled Gaussian over every step of every round the hospital took
part in.

Per-example gradients come from Opacus (`opacus.GradSampleModule`) for LoRA; peft's prompt tuning computes one
prompt for the whole batch and repeats it, which hides the per-example gradients from Opacus, so the trainer gives
each example its own copy of the prompt instead (fednode.learning.adapters). The sampling and the noise are drawn
here, by hand, from a generator seeded with the hospital's secret per-round seed: a restarted node must submit the
same bytes, and no library sampler takes such a seed."""
from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from .privacy import RECORD_MECHANISM as MECHANISM
from .privacy import SEED_POLICIES, PrivacyError, sampled_gaussian, seed_commitment, settings_from


@dataclass(frozen=True)
class RecordDP:
    """The rules' record-level DP: per-example clip, steps and expected batch per round (the accounting depends on
    them, so the rules fix them for every hospital), and either a noise multiplier or a target epsilon for the
    whole federation (each hospital then calibrates its own noise multiplier for its sampling rate)."""

    max_grad_norm: float
    delta: float
    steps: int
    batch_size: int
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    mechanism: str = MECHANISM
    noise_seed: str = "wallet"

    def __post_init__(self):
        if self.mechanism != MECHANISM:
            raise PrivacyError(f"record-level DP is mechanism {MECHANISM!r}, got {self.mechanism!r}")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PrivacyError("dp_sgd takes exactly one of noise_multiplier and target_epsilon")
        for name in ("max_grad_norm", "delta") + (("noise_multiplier",) if self.noise_multiplier is not None
                                                   else ("target_epsilon",)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not value > 0:
                raise PrivacyError(f"{name} must be a finite number > 0, got {value!r}")
        if not self.delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {self.delta}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PrivacyError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.noise_seed not in SEED_POLICIES:
            raise PrivacyError(f"noise_seed must be one of {', '.join(SEED_POLICIES)}, got {self.noise_seed!r}")

    @classmethod
    def from_rules(cls, privacy: Mapping) -> RecordDP | None:
        """The record-level settings a rules' `privacy` object names; None unless its mechanism is dp_sgd."""
        if not isinstance(privacy, Mapping) or privacy.get("mechanism") != MECHANISM:
            return None
        return settings_from(cls, privacy, "dp_sgd")

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def sampling_rate(self, dataset_size: int) -> float:
        """q: the Poisson rate that gives the expected batch size on a training set of this size."""
        return min(1.0, self.batch_size / dataset_size)

    def noise_for(self, dataset_size: int, rounds: int) -> float:
        """The noise multiplier a hospital of this training-set size uses: the rules' own, or the smallest that
        keeps it within target_epsilon after `rounds` rounds (the rules' number of rounds)."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        return calibrate(self.target_epsilon, self.delta, self.sampling_rate(dataset_size), self.steps * rounds)

    def epsilon(self, dataset_size: int, rounds_done: int, rounds: int) -> float:
        """Epsilon spent by a hospital of this size after taking part in `rounds_done` rounds of `rounds`."""
        sigma = self.noise_for(dataset_size, rounds)
        return epsilon_of(self.sampling_rate(dataset_size), sigma, self.steps * rounds_done, self.delta)


def _event(q: float, sigma: float, steps: int):
    # dp_accounting warns for every Renyi order whose series does not converge and leaves that order out
    logging.getLogger("absl").setLevel(logging.ERROR)
    return sampled_gaussian(q, sigma, steps)


@functools.lru_cache(maxsize=1024)
def epsilon_of(q: float, sigma: float, steps: int, delta: float) -> float:
    """RDP epsilon of `steps` Poisson-sampled Gaussian steps at rate q and noise multiplier sigma."""
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    if steps == 0:
        return 0.0
    accountant = RdpAccountant()
    accountant.compose(_event(q, sigma, steps))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def calibrate(target_epsilon: float, delta: float, q: float, steps: int) -> float:
    """The smallest noise multiplier whose RDP epsilon after `steps` steps at rate q is at most target_epsilon
    (dp_accounting's calibration, to 0.1% of the multiplier)."""
    from dp_accounting import mechanism_calibration
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    try:
        return float(mechanism_calibration.calibrate_dp_mechanism(
            RdpAccountant, lambda sigma: _event(q, sigma, steps), target_epsilon, delta,
            mechanism_calibration.ExplicitBracketInterval(0.05, 500.0), tol=1e-4))
    except mechanism_calibration.NoBracketIntervalFoundError:
        raise PrivacyError(f"no noise multiplier up to 500 reaches epsilon {target_epsilon:g} at delta {delta:g} "
                           f"after {steps} steps at sampling rate {q:.3g}") from None


class PrivateRun:
    """One round's DP-SGD randomness and arithmetic for one hospital: Poisson batches and noisy clipped gradients,
    all drawn from the hospital's secret per-round seed; `rounds_done` rounds already spent privacy, `rounds` is the
    rules' number of rounds (the budget a target epsilon is calibrated for)."""

    def __init__(self, settings: RecordDP, dataset_size: int, rounds: int, seed: bytes, rounds_done: int = 0):
        if rounds_done >= rounds:
            raise PrivacyError(f"privacy budget spent: this hospital trained in {rounds_done} rounds, the rules' "
                               f"epsilon is for {rounds}")
        self.settings = settings
        self.dataset_size = dataset_size
        self.rounds = rounds
        self.rounds_done = rounds_done
        self.seed = seed
        self.noise_multiplier = settings.noise_for(dataset_size, rounds)
        self.sampling_rate = settings.sampling_rate(dataset_size)
        self.expected_batch = self.sampling_rate * dataset_size
        self.generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(b"dp-sgd" + seed).digest()[:8],
                                                                      "little"))
        self.clipped = 0  # examples whose gradient was clipped, over the round
        self.examples = 0

    def accounting(self) -> dict:
        """What the update's metrics document says of its privacy: the settings, the noise multiplier and
        sampling rate used, epsilon spent after this round, the seed's commitment."""
        return {**self.settings.to_json(), "noise_multiplier": self.noise_multiplier,
                "sampling_rate": self.sampling_rate, "rounds": self.rounds_done + 1, "accountant": "rdp",
                "epsilon": self.settings.epsilon(self.dataset_size, self.rounds_done + 1, self.rounds),
                "clipped_fraction": self.clipped / self.examples if self.examples else 0.0,
                "noise_seed_sha256": seed_commitment(self.seed)}

    def batches(self, n: int, steps: int) -> Iterator[list[int]]:
        """`steps` Poisson samples of range(n): each index in with probability q (a batch may be empty)."""
        for _ in range(steps):
            yield torch.nonzero(torch.rand(n, generator=self.generator) < self.sampling_rate).flatten().tolist()

    def noisy_gradient(self, per_example: Sequence[torch.Tensor], shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
        """sum_i clip(g_i) + N(0, (sigma C)^2), divided by the expected batch size, per parameter; `per_example`
        holds one (batch, *shape) tensor per parameter (empty batch: noise only)."""
        c = self.settings.max_grad_norm
        if per_example and per_example[0].shape[0]:
            flat = torch.cat([g.reshape(g.shape[0], -1) for g in per_example], dim=1)
            norms = flat.norm(dim=1)
            factors = (c / norms.clamp(min=1e-12)).clamp(max=1.0)
            self.clipped += int((norms > c).sum())
            self.examples += len(norms)
            sums = [torch.einsum("b,b...->...", factors, g) for g in per_example]
        else:
            sums = [torch.zeros(shape) for shape in shapes]
        return [(s + torch.randn(s.shape, generator=self.generator) * (self.noise_multiplier * c)) / self.expected_batch
                for s in sums]
