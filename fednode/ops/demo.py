"""`fedchain demo`: a whole federation on the embedded defaults (in-process chain, embedded store), every
hospital in this one process but each with its own wallet and its own private data."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..audit import run_audit, save_report
from ..learning.data import DataConfig, build_clients, corpus_texts, describe_clients
from ..learning.models import load_base_model
from ..learning.settings import LoraSettings, PromptSettings, TrainSettings
from ..protocol.methods import method
from ..storage import EmbeddedStore
from ..timing import Stopwatch
from .comparison import compare
from .embedded import EmbeddedFederation, method_trainers
from .export import export_global


@dataclass
class DemoConfig:
    model: str = "tiny"
    clients: int = 3
    rounds: int = 3
    partition: str = "natural"
    source: str = "icd10"
    alpha: float = 1.0
    seed: int = 0
    train_per_client: int = 64            # few examples each: alone a hospital overfits them, federated much less
    eval_per_client: int = 64
    out: Path = Path("out/demo")
    cache_dir: Path = field(default_factory=lambda: Path(os.environ.get(
        "FEDCHAIN_CACHE", Path.home() / ".cache" / "fedchain")))
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    train: TrainSettings = field(default_factory=lambda: TrainSettings(steps=20))
    method: str = "fedavg"                # a name in fednode.protocol.methods.METHODS
    round_seconds: int = 3600
    progress: bool = True
    submit: str = "direct"                # "relay": hospitals sign, the aggregator relays their updates in a batch


def _gas_share(w3, verdict, verdicts) -> int:
    """The gas of the transaction that recorded an update, shared among the updates it recorded (a relayed
    batch)."""
    tx = verdict.submission.tx_hash
    return w3.eth.get_transaction_receipt(tx)["gasUsed"] // sum(v.submission.tx_hash == tx for v in verdicts)


def _short(value: str, n: int = 10) -> str:
    return value[:n] + "…"


def _summary(evals: dict[str, dict]) -> dict:
    losses = [e["loss"] for e in evals.values()]
    worst = max(evals, key=lambda k: evals[k]["loss"])
    return {"mean_loss": sum(losses) / len(losses), "worst_loss": evals[worst]["loss"], "worst_client": worst,
            "mean_perplexity": math.exp(sum(losses) / len(losses))}


def run_demo(cfg: DemoConfig, log=print) -> dict:
    started = time.perf_counter()
    watch = Stopwatch()
    cfg.out.mkdir(parents=True, exist_ok=True)

    data_cfg = DataConfig(source=cfg.source, partition=cfg.partition, alpha=cfg.alpha, num_clients=cfg.clients,
                          train_per_client=cfg.train_per_client, eval_per_client=cfg.eval_per_client,
                          seed=cfg.seed)
    with watch("data"):
        clients = build_clients(data_cfg)
    log(describe_clients(clients))

    with watch("model"):
        base = load_base_model(cfg.model, cfg.cache_dir, corpus=lambda: corpus_texts(data_cfg, 4000), seed=cfg.seed)
    log(f"base model {base.name}: identity {base.digest[:16]}…")
    chosen = method(cfg.method)
    trainer, trainers = method_trainers(base, chosen, cfg.lora, cfg.prompt, len(clients))
    log(f"method {chosen.name}: {chosen.description}")

    store = EmbeddedStore(cfg.out / "store")
    train = chosen.train_settings(cfg.train)
    rules = chosen.rules(base.digest, cfg.lora, cfg.prompt, train, rounds=cfg.rounds)
    fed = EmbeddedFederation.create(trainers, clients, rules, train, store, watch, submit=cfg.submit)
    deployment, nodes = fed.deployment, fed.nodes
    log(f"Federation contract {deployment.address('Federation')} on the embedded chain (id {deployment.chain_id})")
    deployment.save(cfg.out / "deployment.json")

    initial = trainer.initial_state(cfg.seed)
    cid = fed.start(initial)
    base_evals = {n.client.name: n.evaluate(fed.base[0], initial) for n in nodes}
    log(f"round 0 (initial adapter {cid}): mean eval loss {_summary(base_evals)['mean_loss']:.4f}")
    rounds = []
    for r in range(1, cfg.rounds + 1):
        run = fed.run_round(min_updates=len(nodes), round_seconds=cfg.round_seconds)
        rec, result = run.record, run.result
        evals = {n.client.name: n.evaluate(result.cid_digest, result.state) for n in nodes}
        export_global(result.state, base, rules.adapter_settings, cfg.out / "adapters" / f"round-{r}")
        rows = []
        by_node = {v.submission.node: v for v in result.verdicts}
        for node, u in zip(nodes, run.updates, strict=True):
            v = by_node[node.address]
            rows.append({"client": node.client.name, "node": node.address, "samples": u.num_samples,
                         "train_loss": u.metrics["train_loss"], "eval_loss": evals[node.client.name]["loss"],
                         "eval_perplexity": evals[node.client.name]["perplexity"], "cid": u.cid,
                         "file_sha256": u.file_sha256.hex(), "metrics_cid": u.metrics_cid,
                         "tx": v.submission.tx_hash, "gas": _gas_share(fed.w3, v, result.verdicts),
                         "relayed": u.receipt is None, "verdict": v.reason.name,
                         "bytes_up": u.size, "bytes_down": result.size,
                         "update_norm": v.update_norm, "epsilon": u.metrics.get("privacy", {}).get("epsilon"),
                         "personal_eval_loss": u.metrics.get("personal_eval_loss")})
        summary = _summary(evals)
        rounds.append({"round": r, "opened_tx": rec.opened_tx, "base_cid_digest": rec.base_cid_digest.hex(),
                       "rules_digest": rec.rules_digest.hex(), "updates": rows,
                       "global": {"cid": result.cid, "file_sha256": result.file_sha256.hex(),
                                  "tx": result.receipt.tx_hash, "gas": result.receipt.gas_used,
                                  "accepted": len(result.accepted), "bytes": result.size,
                                  "verdicts": [int(v.reason) for v in result.verdicts]},
                       "eval": evals, **summary})
        _print_round(log, r, rows, rounds[-1])

    with watch("local baseline"):
        comparison = compare(nodes, initial, result.state, train, cfg.rounds)
    report = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                      if k not in ("lora", "prompt", "train")},
                   "lora": cfg.lora.to_json(), "prompt": cfg.prompt.to_json(), "train": asdict(train)},
        "base_model": {"name": base.name, "digest": base.digest},
        "clients": [{"name": c.name, "train": len(c.train), "eval": len(c.eval), "labels": c.label_counts()}
                    for c in clients],
        "deployment": json.loads(json.dumps(asdict(deployment))),
        "participants": fed.joins,
        "rules": json.loads(rules.to_bytes()),
        "round0": {"eval": base_evals, **_summary(base_evals)},
        "rounds": rounds,
        "comparison": comparison.to_json(),
        "seconds": {**watch.as_dict(), "total": round(time.perf_counter() - started, 3)},
    }
    (cfg.out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    first, last = report["round0"], rounds[-1]
    log(f"\nmean eval loss {first['mean_loss']:.4f} -> {last['mean_loss']:.4f}, worst hospital "
        f"{first['worst_loss']:.4f} -> {last['worst_loss']:.4f} ({last['worst_client']}) after {cfg.rounds} rounds")
    log("\n" + comparison.table())
    log(f"time: {report['seconds']}")
    exported = "full models" if chosen.adapter == "full" else "PEFT adapters"
    log(f"report: {cfg.out / 'report.json'}; {exported}: {cfg.out / 'adapters'}")
    audit = run_audit(fed.w3, deployment, store, verify=True)
    audit.comparison = comparison.to_json()
    save_report(audit, cfg.out / "audit.json", cfg.out / "audit.html")
    log(f"{audit.summary()} from the chain and store alone ({cfg.out / 'audit.html'})")
    return report


def _print_round(log, r: int, rows: list[dict], summary: dict) -> None:
    log(f"\nround {r}")
    log(f"{'client':<12} {'samples':>7} {'train loss':>10} {'eval loss':>9}  {'update CID':<14} {'tx':<12} "
        f"{'gas':>7}  verdict")
    for row in rows:
        log(f"{row['client']:<12} {row['samples']:>7} {row['train_loss']:>10.4f} {row['eval_loss']:>9.4f}  "
            f"{_short(row['cid'], 12):<14} {_short(row['tx'], 10):<12} {row['gas']:>7,}  {row['verdict']}"
            + (f"  DP epsilon {row['epsilon']:.3g}" if row["epsilon"] is not None else "")
            + (f"  start adapter + private one: eval loss {row['personal_eval_loss']:.4f}"
               if row["personal_eval_loss"] is not None else ""))
    g = summary["global"]
    log(f"{'global':<12} {'':>7} {'':>10} {summary['mean_loss']:>9.4f}  {_short(g['cid'], 12):<14} "
        f"{_short(g['tx'], 10):<12} {g['gas']:>7,}  {g['accepted']} merged; worst {summary['worst_client']} "
        f"{summary['worst_loss']:.4f}")
