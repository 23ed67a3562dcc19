"""Quality on non-IID hospitals: federated methods (the full platform path) vs local-only vs centralized training.

Every method starts from its initial adapter (the same LoRA one for local, centralized and the LoRA methods) and
trains in rounds; each round is one `train` call per model (a fresh AdamW from the previous checkpoint, seed =
train seed + round, as a federated node does):

* local: each hospital alone, `steps` steps per round (LoRA, the global config);
* one run per federated method (fednode/protocol/methods.py: its rules, client objective, adapter and per-hospital
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
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from fednode.learning.adapters import make_trainer
from fednode.learning.data import PARTITIONS, SOURCES, ClientData, DataConfig, build_clients, corpus_texts
from fednode.learning.lora_math import aggregation_error
from fednode.learning.models import load_base_model
from fednode.learning.privacy import epsilon
from fednode.learning.settings import ClientObjective, LoraSettings, PromptSettings, TrainSettings
from fednode.learning.training import AdapterTrainer
from fednode.ops.embedded import EmbeddedFederation, method_trainers
from fednode.protocol.methods import METHODS as FEDERATED
from fednode.protocol.methods import Method
from fednode.storage import EmbeddedStore
from fednode.timing import Stopwatch

from .multiple_choice import multiple_choice_items
from .scoring import MC_SCORING, SHARED, BenchmarkError, Checkpoints, Model, SplitScorer, score_checkpoints

BASELINES = ("local", "centralized")
TINY_CORPUS_TEXTS = 4000  # the tiny base's pretraining corpus size, as in `fedchain demo`
ROUND_SECONDS = 3600
PLATFORM_KINDS = ("storage", "chain", "verification", "aggregation")
BUDGET = ("each round every hospital-model runs train.steps AdamW steps of train.batch_size examples (local-only "
          "and every federated method); centralized runs clients * train.steps steps per round on the pooled union "
          "of all hospitals' training data, the federation's total; every round's training starts a fresh AdamW "
          "from the previous checkpoint with seed train.seed + round")

State = dict
Log = Callable[[str], None]


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
    methods: tuple[str, ...] = ("fedavg",)  # federated methods, names in fednode.protocol.methods.METHODS
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
        full = [m for m in self.methods if FEDERATED[m].adapter == "full"]
        if full:  # the baselines train LoRA on the completion loss: they would not compare
            raise BenchmarkError(f"{full[0]!r} trains every weight: its benchmark is scripts/bench_full.py")
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
    "methods": BenchConfig(settings=("icd10:natural", "drugs:natural"), seeds=(0, 1, 2),
                           methods=tuple(m for m, spec in FEDERATED.items() if spec.adapter != "full"),
                           rounds=3, train=TrainSettings(steps=20)),
    # record-level DP-SGD against plain FedAvg at the same large-batch schedule (DP-SGD needs big batches)
    "privacy": BenchConfig(settings=("icd10:natural",), seeds=(0, 1, 2),
                           methods=("fedavg", "dp_sgd-1", "dp_sgd-3", "dp_sgd-8"), rounds=3, train_per_client=4096,
                           mc_items=8, train=TrainSettings(steps=5, batch_size=256, lr=1e-2)),
    # `fedchain demo`'s default setting (64 training examples and 20 steps per hospital and round), over 3 seeds
    "demo": BenchConfig(settings=("icd10:natural",), seeds=(0, 1, 2), methods=("fedavg",), rounds=3,
                        train_per_client=64, train=TrainSettings(steps=20)),
    # update encodings against float32 (and secure aggregation's fixed point) on the same partitions
    "encodings": BenchConfig(settings=("icd10:natural", "drugs:natural"), seeds=(0, 1, 2),
                             methods=("fedavg", "fp16", "bf16", "int8", "int8-top10", "secagg"), rounds=3,
                             train=TrainSettings(steps=20)),
    # sized for about 45 minutes on 2 CPU cores (~5 s per step of batch 8, ~15 s per scored split)
    # 3 seeds sized for about 100 minutes on one CPU thread (~2.5-4.3 s per step of batch 8, ~15 s per scored split)
    "smollm2": BenchConfig(model="smollm2", settings=("icd10:natural", "drugs:natural"), seeds=(0, 1, 2), rounds=3,
                           eval_per_client=32, mc_items=12, train=TrainSettings(steps=4)),
}


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
    watch = Stopwatch()
    with tempfile.TemporaryDirectory(prefix="fedchain-bench-store-") as store_dir:
        setup_started = time.perf_counter()
        trainer, trainers = method_trainers(base, spec, cfg.lora, cfg.prompt, len(clients))
        initial = trainer.initial_state(train.seed)
        train = spec.train_settings(train)
        rules = spec.rules(base.digest, cfg.lora, cfg.prompt, train, rounds=cfg.rounds)
        fed = EmbeddedFederation.create(trainers, clients, rules, train, EmbeddedStore(Path(store_dir)), watch)
        nodes = fed.nodes
        fed.start(initial)
        setup_seconds = time.perf_counter() - setup_started

        checkpoints, stats = [hospital_models(nodes, trainer, initial, 1)], []
        for r in range(1, cfg.rounds + 1):
            before, started = dict(watch.seconds), time.perf_counter()
            run = fed.run_round(min_updates=len(nodes), round_seconds=ROUND_SECONDS)
            rec, updates, result = run.record, run.updates, run.result
            wall = time.perf_counter() - started
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
    privacy = {} if not rules.private else {"privacy": accountant(rules, cfg.rounds, stats)}
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
    published, the bytes each hospital uploaded and the global adapter's (what each downloads next), and (LoRA,
    unmasked) the relative error of plain FedAvg (equal ranks) and the exact merge's SVD truncation
    residual against the weighted mean of the accepted updates' products (lora_math.aggregation_error)."""
    accepted = result.accepted
    out: dict = {"update_norms": [v.update_norm for v in accepted],
                 "bytes": {"upload": [u.size for u in updates], "download": result.size}}
    if rules.private:
        keys = ("epsilon", "pre_clip_norm", "clipped") if rules.dp else ("epsilon", "noise_multiplier",
                                                                         "sampling_rate", "clipped_fraction")
        out["privacy"] = [{k: u.metrics["privacy"][k] for k in keys} for u in updates]
    if rules.adapter == "lora" and rules.secure is None:  # masked updates have no products to compare
        samples = sum(v.submission.num_samples for v in accepted)
        out["aggregation_error"] = aggregation_error([(v.state, v.adapter_config) for v in accepted],
                                                     [v.submission.num_samples / samples for v in accepted],
                                                     rules.lora)
    return out


def accountant(rules, rounds: int, stats: Sequence[dict]) -> dict:
    """The DP settings and the RDP accountant's epsilon after `rounds` rounds at their delta (what nodes report;
    PLD is not used: at noise multiplier 0.01 its discretization exhausts memory). Record-level DP: the largest
    epsilon any hospital reported after the last round (each has its own sampling rate)."""
    if rules.dp is not None:
        return {**rules.dp.to_json(), "rounds": rounds, "accountant": "rdp", "epsilon": epsilon(rules.dp, rounds)}
    last = stats[-1]["privacy"]
    return {**rules.record_dp.to_json(), "rounds": rounds, "accountant": "rdp",
            "epsilon": max(p["epsilon"] for p in last), "noise_multipliers": [p["noise_multiplier"] for p in last]}


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


# ---------------------------------------------------------------- the grid


def run_scenarios(cfg: BenchConfig, cache_dir: Path, log: Log = print,
                  skip: Set[str] = frozenset()) -> Iterator[dict]:
    """Run every scenario of the grid in order (but those named in `skip`), yielding each record as it completes."""
    for scenario in cfg.scenarios():
        if scenario.name not in skip:
            yield run_scenario(cfg, scenario, cache_dir, log)
