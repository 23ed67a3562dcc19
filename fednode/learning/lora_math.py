"""LoRA algebra for exact aggregation. A LoRA module's effective weight change is scale * B @ A (scale = alpha / r,
A of shape (r, in), B of shape (out, r)); averaging A and B separately (FedAvg) is not the average of these
products. Everything runs in float64. A product is summed one rank-1 term at a time (elementwise steps, no
reduction), so products and their weighted means are bit-identical on any machine; only the SVD and QR of
`refactor` and `refactor_sum` depend on the BLAS build (deterministic on one machine)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..flat import Layout
from .settings import LoraSettings, SettingsError

State = Mapping[str, torch.Tensor]
A_TAG, B_TAG = ".lora_A.weight", ".lora_B.weight"
F64 = torch.float64


class LoraError(ValueError):
    """A state or config that is not a LoRA adapter of the expected shape or rank."""


def settings(config: Mapping) -> LoraSettings:
    try:
        return LoraSettings.from_json(config)
    except SettingsError as exc:
        raise LoraError(str(exc)) from None


def scale(config: Mapping) -> float:
    """peft's LoRA scaling alpha / r."""
    lora = settings(config)
    return lora.alpha / lora.r


def lora_modules(state: State) -> dict[str, tuple[str, str]]:
    """{module prefix: (its lora_A key, its lora_B key)}, sorted; every tensor must be one of such a pair."""
    modules = {}
    for key in sorted(state):
        if not key.endswith((A_TAG, B_TAG)):
            raise LoraError(f"tensor {key!r} is not a LoRA A or B weight")
        prefix = key.rsplit(".lora_", 1)[0]
        pair = (prefix + A_TAG, prefix + B_TAG)
        missing = next((k for k in pair if k not in state), None)
        if missing:
            raise LoraError(f"LoRA tensor {key!r} has no partner {missing!r}")
        modules[prefix] = pair
    return modules


def factors(state: State, config: Mapping) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{prefix: (A, B)} in float64, checked to be matrices of the config's rank."""
    r = settings(config).r
    layout = Layout.of(state)
    state = layout.view(layout.flatten(state))  # float64, converted in one pass where the state is one buffer
    out = {}
    for prefix, (a_key, b_key) in lora_modules(state).items():
        a, b = state[a_key], state[b_key]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise LoraError(f"LoRA module {prefix!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, not rank {r} "
                            f"factors (r, in) and (out, r)")
        out[prefix] = (a, b)
    return out


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B @ A, summed one rank-1 term at a time in rank order (bit-identical on any machine)."""
    acc = torch.zeros(b.shape[0], a.shape[1], dtype=F64)
    for k in range(a.shape[0]):
        acc = acc + torch.outer(b[:, k], a[k])
    return acc


def products(state: State, config: Mapping) -> dict[str, torch.Tensor]:
    """{prefix: scale * B @ A} in float64."""
    s = scale(config)
    return {prefix: product(a, b) * s for prefix, (a, b) in factors(state, config).items()}


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum w_i x_i in float64, accumulated in the given order with separate multiply and add steps."""
    acc = torch.zeros(tensors[0].shape, dtype=F64)
    for tensor, weight in zip(tensors, weights, strict=True):
        acc = acc + tensor.to(F64) * weight
    return acc


def squared(x: torch.Tensor) -> float:
    """The squared Frobenius norm."""
    return float(x.square().sum())


def relative(error_sq: float, reference_sq: float) -> float:
    """sqrt(error / reference); 0 when both are 0, inf for an error against a zero reference."""
    if reference_sq == 0:
        return 0.0 if error_sq == 0 else math.inf
    return math.sqrt(error_sq / reference_sq)


def _relatives(pairs: Mapping[str, tuple[float, float]]) -> dict:
    """{"overall": .., "modules": {prefix: ..}} relative errors from per-module (error^2, reference^2)."""
    return {"overall": relative(sum(e for e, _ in pairs.values()), sum(r for _, r in pairs.values())),
            "modules": {prefix: relative(*pair) for prefix, pair in pairs.items()}}


def refactor(dense: Mapping[str, torch.Tensor], config: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """The best rank-r LoRA factors of each module's dense product (SVD, Eckart-Young): B = U_r S_r / scale,
    A = V_r^T (orthonormal rows, so a direction of zero singular value starts like LoRA's B = 0 init), each
    component's sign flipped so that the largest-|.| entry of its A row (the first on ties) is positive. Returns
    the float32 state (sorted keys) and the relative truncation residual ||dense - B A scale||_F / ||dense||_F,
    {"overall": .., "modules": {prefix: ..}}."""
    return _truncated({prefix: _svd(prefix, m, config) for prefix, m in dense.items()}, config)


def _svd(prefix: str, dense: torch.Tensor, config: Mapping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = dense.to(F64)
    if m.dim() != 2 or settings(config).r > min(m.shape):
        raise LoraError(f"module {prefix!r}: a dense update of shape {tuple(m.shape)} has no rank-"
                        f"{settings(config).r} factors")
    return torch.linalg.svd(m, full_matrices=False)


def refactor_sum(terms: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]],
                 config: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """`refactor` of each module's sum of low-rank terms sum_k B_k @ A_k = B_cat @ A_cat (the factors stacked to
    the total rank R), by the cheaper of two exact routes, chosen per module from its shape alone:
    - R below the module's size min(out, in): QR of B_cat = Q_b R_b and of A_cat^T = Q_a R_a, so the sum is
      Q_b (R_b R_a^T) Q_a^T and the SVD of the small R x R core gives the sum's SVD, O((out + in) R^2);
    - R at or above it (many hospitals): the core is no smaller than the module, so the dense sum B_cat @ A_cat
      (one matrix product) is decomposed directly;
    - R below r: the dense SVD, which supplies the orthonormal zero-singular-value directions.
    Modules of the same shape go through the QR route together (batched). Both routes equal `refactor` of the dense
    sum up to float64 rounding."""
    r = settings(config).r
    groups: dict[tuple[int, int, int], list[str]] = {}
    for prefix, pairs in terms.items():
        shape = (pairs[0][1].shape[0], pairs[0][0].shape[1], sum(a.shape[0] for a, _ in pairs))
        groups.setdefault(shape, []).append(prefix)
    svds = {}
    for (out, inn, rank), prefixes in groups.items():
        if rank < r:
            for prefix in prefixes:
                svds[prefix] = _svd(prefix, sum(product(a.to(F64), b.to(F64)) for a, b in terms[prefix]), config)
            continue
        if min(out, inn) < r:
            raise LoraError(f"module {prefixes[0]!r}: a dense update of shape ({out}, {inn}) has no rank-{r} factors")
        if rank >= min(out, inn):  # one module at a time: the SVD dominates, and the stacks stay in cache
            for prefix in prefixes:
                a_cat, b_cat = _stacked(terms[prefix])
                u, sv, vh = torch.linalg.svd(b_cat @ a_cat, full_matrices=False)
                svds[prefix] = (u[:, :r], sv, vh[:r])
            continue
        a_cat, b_cat = (torch.stack(parts) for parts in zip(*(_stacked(terms[p]) for p in prefixes)))
        # Householder QR kept implicit (geqrf): Q is only ever applied to the r leading singular vectors (ormqr)
        h_b, tau_b = torch.geqrf(b_cat)
        h_a, tau_a = torch.geqrf(a_cat.mT)
        u, sv, vh = torch.linalg.svd(h_b[..., :rank, :].triu() @ h_a[..., :rank, :].triu().mT, full_matrices=False)
        u = torch.ormqr(h_b, tau_b, _padded(u[..., :r], out))
        vh = torch.ormqr(h_a, tau_a, _padded(vh[..., :r, :].mT, inn)).mT
        for i, prefix in enumerate(prefixes):
            svds[prefix] = (u[i], sv[i], vh[i])
    return _truncated(svds, config)


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x (..., R, r) with zero rows appended to `rows`: what the full Q of a QR maps to Q_reduced @ x."""
    out = torch.zeros(*x.shape[:-2], rows, x.shape[-1], dtype=x.dtype)
    out[..., :x.shape[-2], :] = x
    return out


def _stacked(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_cat, B_cat) in float64: the terms' A stacked along the rank (rows), their B along the rank (columns)."""
    return torch.cat([a.to(F64) for a, _ in pairs], dim=0), torch.cat([b.to(F64) for _, b in pairs], dim=1)


def _truncated(svds: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               config: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """The sign-normalised rank-r factors and truncation residuals of each module's SVD (u, sv, vh)."""
    r, s = settings(config).r, scale(config)
    state, pairs = {}, {}
    for prefix, (u, sv, vh) in svds.items():
        a, b = vh[:r], u[:, :r] * (sv[:r] / s)
        lead = a.gather(1, a.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        sign = torch.where(lead < 0, -1.0, 1.0).to(F64)
        state[prefix + A_TAG] = (a * sign[:, None]).to(torch.float32)
        state[prefix + B_TAG] = (b * sign).to(torch.float32)
        pairs[prefix] = (squared(sv[r:]), squared(sv))
    return dict(sorted(state.items())), _relatives(dict(sorted(pairs.items())))


def truncate(global_state: State, global_config: Mapping, client_config: Mapping) -> dict[str, torch.Tensor]:
    """The adapter a client with `client_config` starts a round from. A config equal to the global one (every
    adapter type) gives the global tensors; a LoRA config of lower rank gives A_i = A_g[:r_i], B_i = B_g[:, :r_i]
    scaled by scale_g / scale_i, so scale_i B_i A_i is the global product's first r_i components (its best rank-r_i
    approximation when the global came from `refactor`)."""
    if client_config == global_config:
        return dict(global_state)
    own, client = settings(global_config), settings(client_config)
    if client.target_modules != own.target_modules:
        raise LoraError(f"client adapter targets {list(client.target_modules)}, the global one "
                        f"{list(own.target_modules)}")
    if client.r > own.r:
        raise LoraError(f"client LoRA rank {client.r} exceeds the global rank {own.r}")
    ratio = scale(global_config) / scale(client_config)
    out = {}
    for prefix, (a, b) in factors(global_state, global_config).items():
        out[prefix + A_TAG] = a[:client.r].to(torch.float32)
        out[prefix + B_TAG] = (b[:, :client.r] * ratio).to(torch.float32)
    return dict(sorted(out.items()))


def aggregation_error(updates: Sequence[tuple[State, Mapping]], weights: Sequence[float],
                      global_config: Mapping | None = None) -> dict:
    """How far each aggregation is from the weighted mean D of the updates' products scale_i B_i A_i (weights
    normalised to sum 1): "fedavg" = ||scale mean(B) mean(A) - D||_F / ||D||_F (plain FedAvg; only when every
    update has the same rank and alpha), "exact" = the truncation residual of re-factoring D to the rank of
    `global_config` (default: the config of the highest update rank). Overall and in "modules": {prefix: {..}}."""
    if not updates:
        raise LoraError("no updates to measure")
    total = sum(weights)
    weights = [w / total for w in weights]
    configs = [config for _, config in updates]
    every = [products(state, config) for state, config in updates]
    if any(p.keys() != every[0].keys() for p in every):
        raise LoraError("updates adapt different modules")
    dense = {prefix: weighted_mean([p[prefix] for p in every], weights) for prefix in every[0]}
    _, exact = refactor(dense, global_config or max(configs, key=lambda c: settings(c).r))
    out = {"exact": exact["overall"], "modules": {p: {"exact": e} for p, e in exact["modules"].items()}}
    if len({(settings(c).r, settings(c).alpha) for c in configs}) == 1:
        split = [factors(state, config) for state, config in updates]
        s, pairs = scale(configs[0]), {}
        for prefix, target in dense.items():
            a = weighted_mean([f[prefix][0] for f in split], weights)
            b = weighted_mean([f[prefix][1] for f in split], weights)
            pairs[prefix] = (squared(product(a, b) * s - target), squared(target))
        fedavg = _relatives(pairs)
        out["fedavg"] = fedavg["overall"]
        for prefix, e in fedavg["modules"].items():
            out["modules"][prefix]["fedavg"] = e
    return out
