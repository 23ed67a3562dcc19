"""Dishonest hospitals against the aggregation rules, through the full platform path: for each partition (non-IID
source, seed), each rule and each attack scenario (an attack and how many of the hospitals mount it), a fresh
embedded federation runs its rounds with the honest hospitals submitting first and the attackers after them
(research/attacks.py); the final global adapter is scored on every honest hospital's held-out split.

What is compared: the honest hospitals' mean and worst held-out loss under each rule and attack against the clean
FedAvg run (no attacker, the same honest hospitals), and each rule without an attack against FedAvg (its cost)."""
from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fednode.learning.adapters import make_trainer
from fednode.learning.data import DataConfig, build_clients, corpus_texts
from fednode.learning.models import load_base_model
from fednode.learning.settings import LoraSettings, TrainSettings
from fednode.ops.embedded import EmbeddedFederation
from fednode.protocol.aggregator import AggregatorError
from fednode.protocol.rules import FederationRules
from fednode.storage import EmbeddedStore

from .attacks import attack_round, attacks
from .quality import TINY_CORPUS_TEXTS, Scenario

Log = Callable[[str], None]
RULES: dict[str, dict] = {
    "fedavg": {},
    "median": {"aggregation": "median"},
    "trimmed_mean": {"aggregation": "trimmed_mean", "params": {"beta": 0.2}},
    "krum": {"aggregation": "krum", "params": {"f": 1}},
    "multi_krum": {"aggregation": "multi_krum", "params": {"f": 1, "m": 3}},
    "clipped_fedavg": {"server_clip": 1.0},
    "clipped_trimmed_mean": {"aggregation": "trimmed_mean", "params": {"beta": 0.2}, "server_clip": 1.0},
}
CLEAN = ("none", 0)


@dataclass(frozen=True)
class RobustConfig:
    model: str = "tiny"
    settings: tuple[str, ...] = ("icd10:natural", "drugs:natural")
    seeds: tuple[int, ...] = (0, 1, 2)
    hospitals: int = 5
    rounds: int = 3
    train_per_client: int = 256
    eval_per_client: int = 64
    rules: tuple[str, ...] = tuple(RULES)
    scenarios: tuple[tuple[str, int], ...] = (
        CLEAN, ("sign_flip", 1), ("scaled", 1), ("gaussian", 1), ("lie", 1), ("free_rider", 1), ("inflation", 1),
        ("sign_flip", 2), ("scaled", 2), ("gaussian", 2), ("lie", 2))
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=lambda: TrainSettings(steps=20))

    def __post_init__(self) -> None:
        unknown = [r for r in self.rules if r not in RULES] + [a for a, _ in self.scenarios
                                                              if a != "none" and a not in attacks()]
        if unknown:
            raise ValueError(f"unknown rule or attack {unknown[0]!r}")
        if "fedavg" not in self.rules or CLEAN not in self.scenarios:
            raise ValueError("the comparison needs the fedavg rule and the clean scenario ('none', 0)")
        if any(not 0 <= m < self.hospitals / 2 for _, m in self.scenarios):
            raise ValueError(f"attackers must be a minority of the {self.hospitals} hospitals")

    def partitions(self) -> list[Scenario]:
        return [Scenario.parse(spec, seed) for spec in self.settings for seed in self.seeds]

    def to_json(self) -> dict:
        return {**asdict(self), "scenarios": [list(s) for s in self.scenarios], "lora": self.lora.to_json(),
                "rule_params": {r: RULES[r] for r in self.rules}}


PRESETS = {
    "tiny": RobustConfig(),
    "smoke": RobustConfig(settings=("icd10:natural",), seeds=(0,), rounds=1, rules=("fedavg", "median"),
                          scenarios=(CLEAN, ("sign_flip", 1), ("free_rider", 1)), train_per_client=32,
                          eval_per_client=16, train=TrainSettings(steps=2)),
    "smollm2": RobustConfig(model="smollm2", settings=("icd10:natural",), seeds=(0,), rounds=2,
                            rules=("fedavg", "clipped_fedavg", "median"), scenarios=(CLEAN, ("sign_flip", 1)),
                            eval_per_client=32, train=TrainSettings(steps=4)),
}


def run_partition(cfg: RobustConfig, partition: Scenario, cache_dir: Path, log: Log = print) -> dict:
    """Every rule under every scenario on one partition: per run, the honest hospitals' final losses."""
    started = time.perf_counter()
    data = DataConfig(source=partition.source, partition=partition.partition, alpha=partition.alpha,
                      num_clients=cfg.hospitals, train_per_client=cfg.train_per_client,
                      eval_per_client=cfg.eval_per_client, seed=partition.seed)
    clients = build_clients(data)
    base = load_base_model(cfg.model, cache_dir, corpus=lambda: corpus_texts(data, TINY_CORPUS_TEXTS),
                           seed=partition.seed)
    trainer = make_trainer(base, "lora", cfg.lora.to_json())
    train = replace(cfg.train, seed=partition.seed)
    runs = {}
    for rule in cfg.rules:
        for attack, malicious in cfg.scenarios:
            run_started = time.perf_counter()
            runs[f"{rule}/{attack}/{malicious}"] = record = run_one(cfg, base, trainer, clients, train, rule, attack,
                                                                    malicious, partition.seed)
            log(f"  {partition.name} {rule:<20} {attack:>10} x{malicious}: honest mean {record['mean_loss']:.4f}, "
                f"worst {record['worst_loss']:.4f}, rejected {record['rejected']} "
                f"[{time.perf_counter() - run_started:.0f} s]")
    return {"partition": asdict(partition), "setting": partition.setting, "name": partition.name,
            "base_model": base.digest, "runs": runs, "seconds": time.perf_counter() - started}


def run_one(cfg: RobustConfig, base, trainer, clients, train: TrainSettings, rule: str, attack: str,
            malicious: int, seed: int) -> dict:
    """One federation: `malicious` of the hospitals (the last ones) mount `attack` in every round."""
    rules = FederationRules(base_model=base.digest, lora=cfg.lora.to_json(), rounds=cfg.rounds, **RULES[rule])
    with tempfile.TemporaryDirectory(prefix="fedchain-robust-") as store:
        fed = EmbeddedFederation.create([trainer] * len(clients), clients, rules, train, EmbeddedStore(Path(store)))
        fed.start(trainer.initial_state(seed))
        honest_nodes = fed.nodes[:len(fed.nodes) - malicious]
        attackers = fed.nodes[len(honest_nodes):]
        verdicts, state, unmerged = [], trainer.initial_state(seed), None
        for _ in range(cfg.rounds):
            rec = fed.open(min_updates=rules.strategy().min_updates)
            start = fed.aggregator.start_adapter(rec)[0]
            honest = [n.participate(rec) for n in honest_nodes]
            if malicious:
                attack_round(attackers, attacks(malicious)[attack], rec, start, honest)
            try:
                result = fed.finalize(rec)
            except AggregatorError as exc:  # e.g. Krum is left with fewer updates than it needs
                unmerged = str(exc)
                break
            verdicts.append([v.reason.name for v in result.verdicts])
            state = result.state
        losses = {n.client.name: trainer.evaluate(n.client.eval, state)["loss"] for n in honest_nodes}
    return {"honest": losses, "mean_loss": statistics.fmean(losses.values()), "worst_loss": max(losses.values()),
            "worst_client": max(losses, key=losses.get), "verdicts": verdicts, "unmerged": unmerged,
            "rejected": sum(v != "ACCEPTED" for r in verdicts for v in r)}


def run_partitions(cfg: RobustConfig, cache_dir: Path, done: Sequence[str] = (), log: Log = print) -> Iterator[dict]:
    """Every partition not in `done` (their names), each record as it completes."""
    for partition in cfg.partitions():
        if partition.name not in done:
            yield run_partition(cfg, partition, cache_dir, log)


def summarize(cfg: RobustConfig, records: Sequence[dict]) -> dict:
    """Per setting, rule and scenario: the honest hospitals' worst and mean loss minus the clean FedAvg run's on
    the same hospitals (mean, sd, values over seeds), and the rejections."""
    out = {}
    for setting in dict.fromkeys(r["setting"] for r in records):
        mine = [r for r in records if r["setting"] == setting]
        table = {}
        for rule in cfg.rules:
            for attack, malicious in cfg.scenarios:
                diffs = {"worst_loss": [], "mean_loss": []}
                rejected = []
                for record in mine:
                    run = record["runs"][f"{rule}/{attack}/{malicious}"]
                    clean = record["runs"]["fedavg/none/0"]["honest"]
                    reference = [clean[h] for h in run["honest"]]
                    diffs["worst_loss"].append(run["worst_loss"] - max(reference))
                    diffs["mean_loss"].append(run["mean_loss"] - statistics.fmean(reference))
                    rejected.append(run["rejected"])
                table[f"{rule}/{attack}/{malicious}"] = {
                    "rule": rule, "attack": attack, "malicious": malicious, "rejected": rejected,
                    **{f"{k}_minus_clean_fedavg": _spread(v) for k, v in diffs.items()}}
        out[setting] = {"seeds": [r["partition"]["seed"] for r in mine], "runs": table}
    return out


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def markdown(cfg: RobustConfig, summary: dict) -> str:
    """Per setting: rules as rows, scenarios as columns, the honest hospitals' worst held-out loss minus the clean
    FedAvg run's (mean over seeds)."""
    lines = []
    for setting, s in summary.items():
        head = [f"{a} x{m}" if m else "no attack" for a, m in cfg.scenarios]
        lines += [f"**{setting}** ({len(s['seeds'])} seeds): worst honest loss minus clean FedAvg", "",
                  "| rule | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for rule in cfg.rules:
            cells = [s["runs"][f"{rule}/{a}/{m}"]["worst_loss_minus_clean_fedavg"]["mean"] for a, m in cfg.scenarios]
            lines.append(f"| {rule} | " + " | ".join(f"{c:+.4f}" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)
