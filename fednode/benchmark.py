"""Quality on non-IID hospitals: federated methods (the full platform path) vs local-only vs centralized training.

Every method starts from its initial adapter (the same LoRA one for local, centralized and the LoRA methods) and
trains in rounds; each round is one `train` call per model (a fresh AdamW from the previous checkpoint, seed =
train seed + round, as a federated node does):

* local: each hospital alone, `steps` steps per round (LoRA, the global config);
* one run per federated method (fednode/methods.py: its rules, client objective, adapter and per-hospital
  configs): each hospital `steps` steps per round through `Node.participate` (train, privatize when the rules ask,
  package, publish to the embedded store, anchor on the embedded chain), then `Aggregator.finalize` (verify,
  merge with the method's rule, publish, finalize on-chain);
* centralized: one model on the pooled union of all hospitals' training data, `clients * steps` steps per round,
  i.e. the federation's total step budget (LoRA, the global config).

Every checkpoint is scored on each hospital's own held-out split (loss, perplexity, multiple-choice accuracy) with
that hospital's model: its own trainer on the global adapter cut to its rank, plus its private adapter under
personalized rules; after the last round every model is also scored on every other hospital's split (cross-client
matrix). Federated rounds also record DP epsilon (DP methods) and the measured LoRA aggregation error.
"""
from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

from .data import PARTITIONS, SOURCES, ClientData, DataConfig, build_clients, corpus_texts, multiple_choice_items
from .lora_math import aggregation_error
from .methods import METHODS as FEDERATED
from .methods import Method
from .model import load_base_model
from .privacy import epsilon
from .rules import FederationRules
from .settings import ClientObjective, LoraSettings, PromptSettings, TrainSettings
from .timing import Stopwatch
from .training import AdapterTrainer, make_trainer

BASELINES = ("local", "centralized")
SHARED = "global"  # the model key of a method whose hospitals all use one model
TINY_CORPUS_TEXTS = 4000  # the tiny base's pretraining corpus size, as in `fedchain demo`
ROUND_SECONDS = 3600
PLATFORM_KINDS = ("storage", "chain", "verification", "aggregation")
MC_SCORING = ("the option whose ' option' + eos has the highest mean per-token log-likelihood after the prompt "
              "(length-normalised); mc_acc_total picks by the summed log-likelihood instead")
BUDGET = ("each round every hospital-model runs train.steps AdamW steps of train.batch_size examples (local-only "
          "and every federated method); centralized runs clients * train.steps steps per round on the pooled union "
          "of all hospitals' training data, the federation's total; every round's training starts a fresh AdamW "
          "from the previous checkpoint with seed train.seed + round")

State = dict
Log = Callable[[str], None]


class BenchmarkError(ValueError):
    """A benchmark configuration that cannot be run."""


@dataclass(frozen=True)
class Scenario:
    """One data partition to benchmark on: `source:partition[:alpha]` plus a seed."""

    source: str
    partition: str = "natural"
    alpha: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        DataConfig(source=self.source, partition=self.partition, alpha=self.alpha)  # validates all three

    @classmethod
    def parse(cls, spec: str, seed: int) -> Scenario:
        """`icd10:natural`, `drugs:dirichlet:0.1`, ..."""
        parts = spec.split(":")
        if len(parts) not in (2, 3) or parts[0] not in SOURCES or parts[1] not in PARTITIONS:
            raise BenchmarkError(f"setting must be source:partition[:alpha] with source in {', '.join(SOURCES)} "
                                 f"and partition in {', '.join(PARTITIONS)}; got {spec!r}")
        if (parts[1] == "dirichlet") != (len(parts) == 3):
            raise BenchmarkError(f"an alpha is given with (and only with) the dirichlet partition; got {spec!r}")
        try:
            alpha = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            raise BenchmarkError(f"alpha must be a number; got {spec!r}") from None
        return cls(parts[0], parts[1], alpha, seed)

    @property
    def setting(self) -> str:
        """The partition without the seed: what results are averaged over seeds for."""
        return f"{self.source}:{self.partition}" + (f":{self.alpha:g}" if self.partition == "dirichlet" else "")

    @property
    def name(self) -> str:
        return f"{self.setting} seed {self.seed}"


@dataclass(frozen=True)
class BenchConfig:
    """The benchmark grid (settings x seeds), the federated methods, and what every run trains and measures."""

    model: str = "tiny"  # "tiny" | "smollm2"
    settings: tuple[str, ...] = ("icd10:natural",)  # source:partition[:alpha]
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = ("fedavg",)  # federated methods, names in fednode.methods.METHODS
    clients: int = 3
    rounds: int = 2
    train_per_client: int = 256
    eval_per_client: int = 64  # held-out examples per hospital (whole keys; the loss is over all of them)
    mc_items: int = 16  # multiple-choice questions per hospital (at most one per held-out key)
    mc_options: int = 4
    eval_batch_size: int = 16
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    train: TrainSettings = field(default_factory=lambda: TrainSettings(steps=10))  # steps: per hospital per round

    def __post_init__(self) -> None:
        if self.model not in ("tiny", "smollm2"):
            raise BenchmarkError(f"model must be 'tiny' or 'smollm2'; got {self.model!r}")
        for name in ("clients", "rounds", "mc_items", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise BenchmarkError(f"{name} must be >= 1; got {getattr(self, name)!r}")
        for name in ("settings", "seeds", "methods"):
            values = getattr(self, name)
            if not values:
                raise BenchmarkError(f"{name} must name at least one")
            if len(set(values)) != len(values):
                raise BenchmarkError(f"{name} must not repeat; got {values!r}")
        unknown = [m for m in self.methods if m not in FEDERATED]
        if unknown:
            raise BenchmarkError(f"unknown federated method {unknown[0]!r}; known: {', '.join(FEDERATED)}")
        self.scenarios()  # validates every setting

    @property
    def method_names(self) -> tuple[str, ...]:
        """Every method the benchmark runs, in order: local, the federated ones, centralized."""
        return ("local", *self.methods, "centralized")

    def scenarios(self) -> list[Scenario]:
        return [Scenario.parse(spec, seed) for spec in self.settings for seed in self.seeds]

    def data_config(self, scenario: Scenario) -> DataConfig:
        return DataConfig(source=scenario.source, partition=scenario.partition, alpha=scenario.alpha,
                          num_clients=self.clients, train_per_client=self.train_per_client,
                          eval_per_client=self.eval_per_client, seed=scenario.seed)

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k not in ("lora", "prompt", "train")},
                "settings": list(self.settings), "seeds": list(self.seeds), "methods": list(self.methods),
                "federated_methods": {m: {**asdict(FEDERATED[m]), "client_ranks": list(FEDERATED[m].client_ranks)}
                                      for m in self.methods},
                "lora": self.lora.to_json(), "prompt": self.prompt.to_json(), "train": asdict(self.train),
                "budget": BUDGET, "mc_scoring": MC_SCORING}


PRESETS: dict[str, BenchConfig] = {
    # the test suite's smoke run: shares the tiny base of `fedchain demo` (same data config)
    "tiny": BenchConfig(mc_items=8, train=TrainSettings(steps=3)),
    "tiny-full": BenchConfig(
        settings=tuple(f"{s}:{p}" for s in ("icd10", "drugs") for p in ("natural", "dirichlet:0.1", "dirichlet:1")),
        seeds=(0, 1, 2), rounds=3, train=TrainSettings(steps=20)),
    # every federated method on both sources' natural partitions
    "methods": BenchConfig(settings=("icd10:natural", "drugs:natural"), seeds=(0, 1, 2), methods=tuple(FEDERATED),
                           rounds=3, train=TrainSettings(steps=20)),
    # sized for about 45 minutes on 2 CPU cores (~5 s per step of batch 8, ~15 s per scored split)
    "smollm2": BenchConfig(model="smollm2", settings=("icd10:natural", "drugs:natural"), rounds=3,
                           eval_per_client=32, mc_items=12, train=TrainSettings(steps=4)),
}


# ---------------------------------------------------------------- scoring


class Model(NamedTuple):
    """One hospital's model: the trainer that runs it, its adapter and (personalized rules) its private adapter."""

    trainer: AdapterTrainer
    state: State
    local: State | None = None


Checkpoints = list[dict[str, Model]]  # per round from 0: the model per hospital name, or {SHARED: one for all}


class Choice(NamedTuple):
    prompt: str
    completion: str


class SplitScorer:
    """Scores models on the hospitals' held-out splits: completion loss, perplexity, multiple-choice accuracy."""

    def __init__(self, questions: Mapping[str, list[tuple[str, list[str], int]]], batch_size: int,
                 max_length: int):
        self.questions = questions
        self.batch_size = batch_size
        self.max_length = max_length

    def __call__(self, model: Model, client: ClientData) -> dict:
        loss = model.trainer.evaluate(client.eval, model.state, self.batch_size, self.max_length,
                                      local_state=model.local)
        return {"loss": loss["loss"], "perplexity": loss["perplexity"],
                **multiple_choice_accuracy(model, self.questions[client.name], self.batch_size, self.max_length)}


def multiple_choice_accuracy(model: Model, questions: Sequence[tuple[str, list[str], int]], batch_size: int = 16,
                             max_length: int = 64) -> dict:
    """Accuracy over `(prompt, options, answer_idx)` questions, every option scored in one batched pass:
    `mc_acc` picks by mean per-token log-likelihood (length-normalised), `mc_acc_total` by the sum."""
    if not questions:
        raise BenchmarkError("no multiple-choice questions to score")
    flat = [Choice(prompt, option) for prompt, options, _ in questions for option in options]
    scores = iter(model.trainer.score(flat, model.state, batch_size, max_length, local_state=model.local))
    normalised = total = 0
    for _, options, answer in questions:
        option_scores = [next(scores) for _ in options]
        normalised += _argmax([ll / n for ll, n in option_scores]) == answer
        total += _argmax([ll for ll, _ in option_scores]) == answer
    return {"mc_acc": normalised / len(questions), "mc_acc_total": total / len(questions),
            "mc_items": len(questions)}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties go to the first option


# ---------------------------------------------------------------- the methods


def train_local(trainer: AdapterTrainer, clients: Sequence[ClientData], initial: State, train: TrainSettings,
                rounds: int, log: Log) -> tuple[Checkpoints, dict]:
    """Each hospital alone: per round, the model per hospital and the training metrics."""
    states = {c.name: initial for c in clients}
    checkpoints, stats = [{SHARED: Model(trainer, initial)}], []
    for r in range(1, rounds + 1):
        row = {}
        for c in clients:
            states[c.name], row[c.name] = trainer.train(c.train, replace(train, seed=train.seed + r),
                                                        states[c.name], progress=False)
        checkpoints.append({name: Model(trainer, state) for name, state in states.items()})
        stats.append({"round": r, "models": _train_stats(row)})
        log(f"  local round {r}: train loss " + ", ".join(f"{v['train_loss']:.3f}" for v in row.values()))
    return checkpoints, {"rounds": stats}


def train_centralized(trainer: AdapterTrainer, clients: Sequence[ClientData], initial: State, train: TrainSettings,
                      rounds: int, log: Log) -> tuple[Checkpoints, dict]:
    """One model on the pooled union, clients * steps steps per round."""
    pooled = [ex for c in clients for ex in c.train]
    state, checkpoints, stats = initial, [{SHARED: Model(trainer, initial)}], []
    for r in range(1, rounds + 1):
        settings = replace(train, steps=train.steps * len(clients), seed=train.seed + r)
        state, metrics = trainer.train(pooled, settings, state, progress=False)
        checkpoints.append({SHARED: Model(trainer, state)})
        stats.append({"round": r, "models": _train_stats({SHARED: metrics})})
        log(f"  centralized round {r}: train loss {metrics['train_loss']:.3f} ({metrics['steps']} steps)")
    return checkpoints, {"rounds": stats, "samples": len(pooled)}


def train_federated(base, spec: Method, cfg: BenchConfig, clients: Sequence[ClientData], train: TrainSettings,
                    log: Log) -> tuple[Checkpoints, dict]:
    """Federated method `spec` through the platform: nodes (one trainer per hospital, as the method configures
    it) and aggregator on a fresh embedded chain and a temporary embedded store. Per round: every hospital's model,
    and the nodes' training metrics, verdicts, gas, wall time by kind, DP accounting and aggregation error."""
    from .demo import embedded_federation, method_trainers
    from .storage import EmbeddedStore

    watch = Stopwatch()
    with tempfile.TemporaryDirectory(prefix="fedchain-bench-store-") as store_dir:
        setup_started = time.perf_counter()
        trainer, trainers = method_trainers(base, spec, cfg.lora, cfg.prompt, len(clients))
        initial = trainer.initial_state(train.seed)
        rules = spec.rules(base.digest, cfg.lora, cfg.prompt, rounds=cfg.rounds)
        fed = embedded_federation(trainers, clients, rules, train, EmbeddedStore(Path(store_dir)), watch)
        aggregator, nodes = fed.aggregator, fed.nodes
        _, cid_digest, sha = aggregator.publish_global(0, initial)
        setup_seconds = time.perf_counter() - setup_started

        checkpoints, stats = [hospital_models(nodes, trainer, initial, 1)], []
        for r in range(1, cfg.rounds + 1):
            before, started = dict(watch.seconds), time.perf_counter()
            rec = aggregator.open_round(cid_digest, sha, ROUND_SECONDS, min_updates=len(nodes))
            updates = [node.participate(rec) for node in nodes]
            result = aggregator.finalize(rec)
            wall = time.perf_counter() - started
            cid_digest, sha = result.cid_digest, result.file_sha256
            checkpoints.append(hospital_models(nodes, trainer, result.state, r + 1))
            seconds = {k: v - before.get(k, 0.0) for k, v in sorted(watch.seconds.items())}
            platform = sum(seconds.get(k, 0.0) for k in PLATFORM_KINDS)
            stats.append({
                "round": r, "chain_round": rec.round_id,
                "models": _train_stats({u.metrics["hospital"]: u.metrics for u in updates}),
                "verdicts": [v.reason.name for v in result.verdicts], "accepted": len(result.accepted),
                "gas": {"updates": [u.receipt.gas_used for u in updates], "finalize": result.receipt.gas_used},
                "seconds": {**seconds, "platform": platform, "wall": wall},
                "platform_fraction": platform / wall,
                "training_fraction": seconds.get("training", 0.0) / wall,
                **round_measures(rules, updates, result),
            })
            if len(result.accepted) != len(nodes):
                log(f"  WARNING {spec.name} round {r}: verdicts {stats[-1]['verdicts']}")
            log(f"  {spec.name} round {r}: {len(result.accepted)}/{len(nodes)} merged, {wall:.1f} s (training "
                f"{seconds.get('training', 0.0):.1f} s, platform {platform:.2f} s = {platform / wall:.1%})")
    privacy = {} if rules.dp is None else {"privacy": accountant(rules.dp, cfg.rounds)}
    return checkpoints, {"rounds": stats, "setup_seconds": setup_seconds, "rules": json.loads(rules.to_bytes()),
                         **privacy}


def hospital_models(nodes: Sequence, trainer: AdapterTrainer, state: State, next_round: int) -> dict[str, Model]:
    """Every hospital's model entering round `next_round` from global adapter `state`: its own trainer on `state`
    cut to its rank, with the private adapter it enters that round with under personalized rules; one SHARED entry
    when every hospital's model is the global one."""
    personalized = trainer.objective.personalized
    if not personalized and all(n.trainer is trainer for n in nodes):
        return {SHARED: Model(trainer, state)}
    return {n.client.name: Model(n.trainer, n.start_state(state),
                                 n.personal_state(next_round) if personalized else None) for n in nodes}


def round_measures(rules, updates: Sequence, result) -> dict:
    """What a federated round adds to its record: the accepted updates' norms, the DP accounting the nodes
    published, and (LoRA) the relative error of plain FedAvg (equal ranks) and the exact merge's SVD truncation
    residual against the weighted mean of the accepted updates' products (lora_math.aggregation_error)."""
    accepted = result.accepted
    out: dict = {"update_norms": [v.update_norm for v in accepted]}
    if rules.dp is not None:
        out["privacy"] = [{k: u.metrics["privacy"][k] for k in ("epsilon", "pre_clip_norm", "clipped")}
                          for u in updates]
    if rules.adapter == "lora":
        samples = sum(v.submission.num_samples for v in accepted)
        out["aggregation_error"] = aggregation_error([(v.state, v.adapter_config) for v in accepted],
                                                     [v.submission.num_samples / samples for v in accepted],
                                                     rules.lora)
    return out


def accountant(dp, rounds: int) -> dict:
    """The DP settings and the RDP accountant's epsilon after `rounds` rounds at their delta (what nodes report;
    PLD is not used: at noise multiplier 0.01 its discretization exhausts memory)."""
    return {**dp.to_json(), "rounds": rounds, "accountant": "rdp", "epsilon": epsilon(dp, rounds)}


def _train_stats(metrics: Mapping[str, Mapping]) -> dict[str, dict]:
    """The trainer's metrics per model (a node's carry no seconds: its stopwatch has them)."""
    keys = ("train_loss", "steps", "samples", "tokens", "seconds", "orthogonality", "personal_eval_loss")
    return {name: {k: m[k] for k in keys if k in m} for name, m in metrics.items()}


def method_kind(name: str) -> str:
    """"local", "centralized" or "federated"."""
    return name if name in BASELINES else "federated"


# ---------------------------------------------------------------- one scenario


def run_scenario(cfg: BenchConfig, scenario: Scenario, cache_dir: Path, log: Log = print) -> dict:
    """Train every method on one partition and score every checkpoint; returns the scenario's record."""
    started = time.perf_counter()
    data_cfg = cfg.data_config(scenario)
    clients = build_clients(data_cfg)
    base = load_base_model(cfg.model, cache_dir, corpus=lambda: corpus_texts(data_cfg, TINY_CORPUS_TEXTS),
                           seed=scenario.seed)
    lora = make_trainer(base, "lora", cfg.lora.to_json(), ClientObjective())
    train = replace(cfg.train, seed=scenario.seed)
    initial = lora.initial_state(scenario.seed)
    questions = {c.name: multiple_choice_items(c, cfg.mc_options, scenario.seed)[:cfg.mc_items] for c in clients}
    score = SplitScorer(questions, cfg.eval_batch_size, train.max_length)
    log(f"{scenario.name}: {len(clients)} hospitals, train {[len(c.train) for c in clients]}, "
        f"eval {[len(c.eval) for c in clients]}, MC {[len(q) for q in questions.values()]}; base {base.name}")

    runs = {"local": partial(train_local, lora, clients, initial, train, cfg.rounds, log),
            "centralized": partial(train_centralized, lora, clients, initial, train, cfg.rounds, log),
            **{m: partial(train_federated, base, FEDERATED[m], cfg, clients, train, log) for m in cfg.methods}}
    methods = {}
    for name in cfg.method_names:
        method_started = time.perf_counter()
        checkpoints, train_stats = runs[name]()
        methods[name] = {"kind": method_kind(name), **score_checkpoints(score, clients, checkpoints),
                         "training": train_stats}
        final = methods[name]["final"]
        log(f"  {name}: mean loss {final['mean_loss']:.4f}, worst {final['worst_loss']:.4f} "
            f"({final['worst_loss_client']}), mean acc {final['mean_acc']:.3f}, worst acc {final['worst_acc']:.3f}"
            + (f", epsilon {train_stats['privacy']['epsilon']:.3g}" if "privacy" in train_stats else "")
            + f" [{time.perf_counter() - method_started:.0f} s]")
    return {
        "scenario": asdict(scenario), "setting": scenario.setting, "name": scenario.name,
        "base_model": {"name": base.name, "digest": base.digest},
        "clients": [{"name": c.name, "train": len(c.train), "eval": len(c.eval), "mc_items": len(questions[c.name]),
                     "labels": c.label_counts()} for c in clients],
        "methods": methods,
        "seconds": time.perf_counter() - started,
    }


def score_checkpoints(score: SplitScorer, clients: Sequence[ClientData], checkpoints: Checkpoints) -> dict:
    """Per-hospital own-split curves (from round 0), per-round summaries, and the final cross-client matrix:
    `hospitals[h]['cross'][g]` scores h's model (the shared one if any) on g's split."""
    curves: dict[str, list[dict]] = {c.name: [] for c in clients}
    matrix: dict[str, dict[str, dict]] = {}
    for r, models in enumerate(checkpoints):
        model_on = _memo_scorer(score, models)
        for c in clients:
            curves[c.name].append({"round": r, **model_on(c, c)})
        if r == len(checkpoints) - 1:
            matrix = {c.name: {g.name: model_on(c, g) for g in clients} for c in clients}
    hospitals = {}
    for c in clients:
        cross = {g: m for g, m in matrix[c.name].items() if g != c.name}
        hospitals[c.name] = {"own": matrix[c.name][c.name], "curve": curves[c.name], "cross": cross,
                             "cross_mean": _mean_metrics(cross.values()) if cross else None}
    rounds = [summarize_round({c.name: curves[c.name][r] for c in clients}) | {"round": r}
              for r in range(len(checkpoints))]
    off_diagonal = [m for h in hospitals.values() for m in h["cross"].values()]
    return {"hospitals": hospitals, "rounds": rounds,
            "final": {**rounds[-1], "cross": _mean_metrics(off_diagonal) if off_diagonal else None}}


def _memo_scorer(score: SplitScorer, models: Mapping[str, Model]) -> Callable[[ClientData, ClientData], dict]:
    """`model_on(owner, split)`: the owner's model (the shared one if any) scored on `split`, each pair once."""
    scored: dict[tuple[str, str], dict] = {}

    def model_on(owner: ClientData, split: ClientData) -> dict:
        key = (owner.name if owner.name in models else SHARED, split.name)
        if key not in scored:
            scored[key] = score(models[key[0]], split)
        return scored[key]

    return model_on


def _mean_metrics(metrics: Iterable[Mapping]) -> dict:
    metrics = list(metrics)
    return {k: statistics.fmean(m[k] for m in metrics) for k in ("loss", "mc_acc")}


def summarize_round(own: Mapping[str, Mapping]) -> dict:
    """Mean, worst, best and best-worst gap over hospitals of own-split loss and multiple-choice accuracy."""
    worst_loss = max(own, key=lambda h: own[h]["loss"])
    best_loss = min(own, key=lambda h: own[h]["loss"])
    worst_acc = min(own, key=lambda h: own[h]["mc_acc"])
    best_acc = max(own, key=lambda h: own[h]["mc_acc"])
    mean_loss = statistics.fmean(m["loss"] for m in own.values())
    return {
        "mean_loss": mean_loss, "mean_perplexity": math.exp(mean_loss),
        "worst_loss": own[worst_loss]["loss"], "worst_loss_client": worst_loss,
        "worst_perplexity": own[worst_loss]["perplexity"],
        "loss_gap": own[worst_loss]["loss"] - own[best_loss]["loss"],
        "mean_acc": statistics.fmean(m["mc_acc"] for m in own.values()),
        "worst_acc": own[worst_acc]["mc_acc"], "worst_acc_client": worst_acc,
        "acc_gap": own[best_acc]["mc_acc"] - own[worst_acc]["mc_acc"],
    }


# ---------------------------------------------------------------- the grid


def run_scenarios(cfg: BenchConfig, cache_dir: Path, log: Log = print) -> Iterator[dict]:
    """Run every scenario of the grid in order, yielding each record as it completes."""
    for scenario in cfg.scenarios():
        yield run_scenario(cfg, scenario, cache_dir, log)


SUMMARY_METRICS = ("mean_loss", "worst_loss", "loss_gap", "mean_acc", "worst_acc", "acc_gap")
DIFF_METRICS = ("worst_loss", "mean_loss", "worst_acc", "mean_acc")
AGGREGATION_ERRORS = ("fedavg", "exact")  # lora_math.aggregation_error's overall relative errors


def summarize(cfg: BenchConfig, scenarios: Sequence[dict]) -> dict:
    """Per setting and method: every final summary metric over seeds (mean, sd, values); per federated method
    also its differences to local and to centralized, the platform's share of its round wall time, its DP
    epsilon (DP methods) and its aggregation error over every round and seed (LoRA methods)."""
    out = {}
    for setting in dict.fromkeys(s["setting"] for s in scenarios):
        runs = [s for s in scenarios if s["setting"] == setting]
        final = {m: {k: [s["methods"][m]["final"][k] for s in runs] for k in SUMMARY_METRICS}
                 | {"cross_loss": [s["methods"][m]["final"]["cross"]["loss"] for s in runs]} for m in cfg.method_names}
        methods = {}
        for m in cfg.method_names:
            methods[m] = {"kind": method_kind(m), "final": {k: _spread(v) for k, v in final[m].items()}}
            if m in FEDERATED:
                methods[m] |= _federated_summary(final, m, [s["methods"][m]["training"] for s in runs])
        out[setting] = {"seeds": [s["scenario"]["seed"] for s in runs], "methods": methods}
    return out


def _federated_summary(final: Mapping[str, dict], method: str, trainings: Sequence[dict]) -> dict:
    rounds = [r for t in trainings for r in t["rounds"]]
    platform, training, wall = (sum(r["seconds"].get(k, 0.0) for r in rounds) for k in ("platform", "training", "wall"))
    out = {f"minus_{b}": {k: _spread([f - v for f, v in zip(final[method][k], final[b][k])]) for k in DIFF_METRICS}
           for b in BASELINES}
    out["seconds"] = {"platform": platform, "training": training, "wall": wall,
                      "platform_fraction": platform / wall, "training_fraction": training / wall}
    if "privacy" in trainings[0]:
        out["epsilon"] = _spread([t["privacy"]["epsilon"] for t in trainings])
    if "aggregation_error" in rounds[0]:
        out["aggregation_error"] = {k: _spread([r["aggregation_error"][k] for r in rounds])
                                    for k in AGGREGATION_ERRORS if k in rounds[0]["aggregation_error"]}
    return out


def _aggregation_cell(method: Mapping) -> str:
    errors = method.get("aggregation_error", {})
    return " / ".join(f"{errors[k]['mean']:.2g}" if k in errors else "–" for k in AGGREGATION_ERRORS) \
        if errors else ""


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def markdown_table(summary: Mapping[str, dict]) -> str:
    """Settings x methods: final mean/worst loss, loss gap, cross loss, mean/worst accuracy (mean ± sd over seeds),
    DP epsilon and aggregation error where measured; then each federated method's differences to the baselines."""
    def cell(v: dict, digits: int) -> str:
        return f"{v['mean']:.{digits}f}" + (f" ± {v['sd']:.{digits}f}" if len(v["values"]) > 1 else "")

    lines = [("| setting | method | mean loss | worst loss | loss gap | cross loss | mean acc | worst acc | epsilon | "
              "agg. error: FedAvg / SVD residual | seeds |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting, s in summary.items():
        for method, m in s["methods"].items():
            f = m["final"]
            epsilon = f"{m['epsilon']['mean']:.3g}" if "epsilon" in m else ""
            lines.append(f"| {setting} | {method} | {cell(f['mean_loss'], 4)} | {cell(f['worst_loss'], 4)} | "
                         f"{cell(f['loss_gap'], 4)} | {cell(f['cross_loss'], 4)} | {cell(f['mean_acc'], 3)} | "
                         f"{cell(f['worst_acc'], 3)} | {epsilon} | {_aggregation_cell(m)} | {len(s['seeds'])} |")
    lines += ["", ("| setting | method | worst loss: - local | worst loss: - centralized | mean loss: - local | "
                   "worst acc: - local | platform share of round time |"), "|---|---|---|---|---|---|---|"]
    for setting, s in summary.items():
        for method, m in s["methods"].items():
            if m["kind"] == "federated":
                fl, fc = m["minus_local"], m["minus_centralized"]
                lines.append(f"| {setting} | {method} | {cell(fl['worst_loss'], 4)} | {cell(fc['worst_loss'], 4)} | "
                             f"{cell(fl['mean_loss'], 4)} | {cell(fl['worst_acc'], 3)} | "
                             f"{m['seconds']['platform_fraction']:.1%} |")
    return "\n".join(lines) + "\n"
