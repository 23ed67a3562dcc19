"""The platform at 3 to 100 hospitals a round, and the aggregation kernels against Flower and a memory read.

    python scripts/bench_scale.py [--hospitals 3,10,30,100] [--audit-rounds 10] [--repeats 3] [--quick]

Round: on the embedded chain and on a real anvil side by side, N hospitals join, then one round runs with tiny
LoRA adapters (no training): every hospital publishes and submits, the aggregator opens, reads, verifies, merges
and finalizes; a restarted reader rebuilds the history from the chain. On anvil, `--audit-rounds` rounds at the
largest N are then audited (`fedchain audit --verify`). Kernels: on identical SmolLM2-shaped updates (LoRA r=8 on
q/k/v/o, 30 layers, 3.69 MB each), FedAvg, FedAdam and lora_exact (both exact routes) against Flower's legacy
`aggregate` (flwr, the optional `bench` extra) and a raw read of every input once (sum of float32 buffers), and
verification of one update against sha256 + safetensors load. Times are minima over interleaved repeats; ratios
are taken within this one run. Writes scripts/results/scale.json and prints tables.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = {"layers": 30, "hidden": 576, "kv": 192, "r": 8}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hospitals", default="3,10,30,100")
    p.add_argument("--audit-rounds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine "
                                                           "OpenMP threads spin against other processes)")
    p.add_argument("--chains", default="embedded,anvil")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: round, kernels")
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = p.parse_args(argv)
    args.hospitals = [int(n) for n in args.hospitals.split(",")]
    args.chains = args.chains.split(",")
    args.skip = set(filter(None, args.skip.split(",")))
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def best(function, repeats: int) -> float:
    """The minimum wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


# ---------------------------------------------------------------- a whole round


def tiny_state(seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(2):
        for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[prefix + ".lora_A.weight"] = torch.randn(8, 64, generator=gen) * 0.01
            state[prefix + ".lora_B.weight"] = torch.randn(64, 8, generator=gen) * 0.01
    return state


def round_at(w3, n: int, rounds: int, audit: bool, log) -> dict:
    """N hospitals joined, then `rounds` rounds (submissions, the aggregator's whole round), a fresh history read
    and (with `audit`) a verified audit. Seconds per part, first round and last."""
    from chain.clients import Federation
    from chain.connection import is_embedded
    from chain.deployment import deploy
    from chain.wallet import dev_account, fund
    from fednode.audit.reconstruct import run_audit
    from fednode.learning.data import ClientData, Example
    from fednode.learning.settings import LoraSettings, TrainSettings
    from fednode.ops.embedded import ADMIN_ACCOUNT, AGGREGATOR_ACCOUNT, node_account
    from fednode.protocol.aggregator import Aggregator
    from fednode.protocol.ledger import Ledger
    from fednode.protocol.node import Node
    from fednode.protocol.packaging import adapter_metadata, pack_adapter
    from fednode.protocol.rules import FederationRules
    from fednode.storage import EmbeddedStore
    from fednode.timing import Stopwatch

    lora = LoraSettings().to_json()
    rules = FederationRules(base_model=hashlib.sha256(b"bench-scale").hexdigest(), lora=lora, copy_threshold=0.0)
    examples = [Example("p", "c", "l", "bench", "k")] * 16
    with tempfile.TemporaryDirectory(prefix="bench-scale-store-") as folder:
        store = EmbeddedStore(Path(folder))
        admin, agg_account = dev_account(w3, ADMIN_ACCOUNT), dev_account(w3, AGGREGATOR_ACCOUNT)
        deployment = deploy(w3, admin, agg_account.address)
        admin_fed = Federation(w3, deployment, admin)
        nodes = []
        for i in range(n):
            account = node_account(10_000 + i)
            fund(w3, admin, account.address, 10**19)
            node = Node(Federation(w3, deployment, account), store, None,
                        ClientData(f"hospital-{i}", examples, []), rules, TrainSettings(), adapter_config=lora)
            node.join()
            admin_fed.approve(node.address)
            nodes.append(node)
        watch = Stopwatch()
        agg = Aggregator(Federation(w3, deployment, agg_account), store, rules, watch, log=lambda m: None)
        state = tiny_state(0)
        _, cid_digest, sha = agg.publish_global(0, state)
        per_round = []
        for r in range(rounds):
            started = time.perf_counter()
            rec = agg.open_round(cid_digest, sha, 3600, n)
            opened = time.perf_counter() - started
            started = time.perf_counter()
            for i, node in enumerate(nodes):
                update = {k: v + 0.001 * (i + 1) for k, v in state.items()}
                meta = adapter_metadata(deployment.federation_id, rec.round_id, node.address, rules.base_model,
                                        lora, "update")
                node.publish_and_submit(rec.round_id, pack_adapter(update, meta), 16, {
                    "round": rec.round_id, "node": node.address, "hospital": node.client.name, "train_loss": 1.0,
                    "steps": 1, "samples": 16, "tokens": 1, "global_eval_loss": 1.0, "global_eval_perplexity": 2.7})
            submissions = time.perf_counter() - started
            watch.seconds.clear()
            started = time.perf_counter()
            assert agg.ready(rec)
            result = agg.finalize(rec)
            closing = time.perf_counter() - started
            assert len(result.accepted) == n, [v.detail for v in result.verdicts if not v.accepted][:3]
            cid_digest, sha, state = result.cid_digest, result.file_sha256, result.state
            per_round.append({"submissions_s": submissions, "per_submission_s": submissions / n,
                              "aggregator_round_s": opened + closing, "open_s": opened, "parts_s": watch.as_dict()})
            log(f"  N={n} round {r + 1}: submissions {submissions:.2f} s, aggregator {opened + closing:.2f} s "
                f"{watch.as_dict()}")
        started = time.perf_counter()
        history = Ledger(Federation(w3, deployment)).refresh()
        fresh_read = time.perf_counter() - started
        out = {"hospitals": n, "rounds": rounds, "events": len(history.events), "fresh_history_read_s": fresh_read,
               "first_round": per_round[0], "last_round": per_round[-1]}
        if is_embedded(w3):
            out["receipt_lookup_s"] = receipt_lookups(w3, [e.tx_hash for e in history.events])
        if audit:
            started = time.perf_counter()
            report = run_audit(w3, deployment, store, verify=True)
            out["audit_s"] = time.perf_counter() - started
            out["audit_statuses"] = sorted({r.status.name for r in report.rounds})
            out["audit_parts_s"] = report.seconds
            log(f"  audit of {rounds} rounds x {n}: {out['audit_s']:.2f} s {out['audit_statuses']}")
        return out


def receipt_lookups(w3, tx_hashes: list[str]) -> dict:
    """Seconds per receipt on the embedded chain, found through the hash index (chain.connection) and by
    eth-tester's own scan back from the head (what every receipt, and every log of eth_getLogs, cost before),
    on the same chain and a sample of the same transactions."""
    from eth_tester import PyEVMBackend

    backend = w3.provider.ethereum_tester.backend
    sample = [bytes.fromhex(h.removeprefix("0x")) for h in tx_hashes[::max(1, len(tx_hashes) // 40)]]
    indexed = best(lambda: [backend.get_transaction_receipt(h) for h in sample], 1) / len(sample)
    scanned = best(lambda: [PyEVMBackend.get_transaction_receipt(backend, h) for h in sample], 1) / len(sample)
    return {"indexed": indexed, "eth_tester_scan": scanned, "scan_vs_indexed": scanned / indexed}


def round_scale(args, log) -> dict:
    from chain.connection import connect
    from devstack import anvil

    out = {}
    for chain in args.chains:
        rows = []
        for n in args.hospitals:
            audit = chain == "anvil" and n == max(args.hospitals) and args.audit_rounds > 0
            rounds = args.audit_rounds if audit else 1
            if chain == "embedded":
                rows.append(round_at(connect("embedded"), n, rounds, False, log))
                continue
            with tempfile.TemporaryDirectory(prefix="bench-scale-anvil-") as state_dir:
                handle = anvil.start(Path(state_dir), port=free_port(), persist=False)  # no state dumps
                try:
                    rows.append(round_at(connect(handle.url), n, rounds, audit, log))
                finally:
                    anvil.stop(Path(state_dir))
        out[chain] = rows
    return out


# ---------------------------------------------------------------- kernels on SmolLM2-shaped updates


def smollm2_updates(n: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    shapes = {}
    for layer in range(SMOLLM2["layers"]):
        for module, out in (("q_proj", SMOLLM2["hidden"]), ("k_proj", SMOLLM2["kv"]), ("v_proj", SMOLLM2["kv"]),
                            ("o_proj", SMOLLM2["hidden"])):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            shapes[prefix + ".lora_A.weight"] = (SMOLLM2["r"], SMOLLM2["hidden"])
            shapes[prefix + ".lora_B.weight"] = (out, SMOLLM2["r"])
    start = {k: torch.randn(s, generator=gen) * 0.02 for k, s in sorted(shapes.items())}
    updates = [{k: v + torch.randn(v.shape, generator=gen) * 0.01 for k, v in start.items()} for _ in range(n)]
    return start, updates


def kernels(args, log) -> dict:
    import numpy as np
    import torch

    from fednode.flat import concat
    from fednode.learning.settings import LoraSettings
    from fednode.strategies.base import WeightedUpdate
    from fednode.strategies.fedavg import FedAvg
    from fednode.strategies.fedopt import FedAdam
    from fednode.strategies.lora_exact import LoraExact

    try:
        from flwr.server.strategy.aggregate import aggregate as flower_aggregate
        import flwr
        flower = flwr.__version__
    except ImportError:
        flower_aggregate, flower = None, None
    config = LoraSettings().to_json()
    start, updates = smollm2_updates(max(args.hospitals))
    start, updates = concat(start), [concat(u) for u in updates]  # as verification hands them over
    rows = []
    for n in args.hospitals:
        weighted = [WeightedUpdate(i, 16 + i, u, None, hashlib.sha256(str(i).encode()).digest())
                    for i, u in enumerate(updates[:n])]
        arrays = [([u[k].numpy() for k in sorted(u)], 16 + i) for i, u in enumerate(updates[:n])]
        buffers = [torch.cat([u[k].reshape(-1) for k in sorted(u)]) for u in updates[:n]]

        def memory_read():
            total = torch.zeros_like(buffers[0])
            for b in buffers:
                total += b
            return total

        cases = {"memory_read": memory_read,
                 "fedavg": lambda: FedAvg(adapter_config=config).aggregate_train(start, weighted),
                 "fedadam": lambda: FedAdam(adapter_config=config).aggregate_train(start, weighted),
                 "lora_exact": lambda: LoraExact(adapter_config=config).aggregate_train(start, weighted)}
        if flower_aggregate is not None:
            cases["flower_aggregate"] = lambda: flower_aggregate(arrays)
        times = {name: [] for name in cases}
        for _ in range(args.repeats):  # interleaved: every case once per repeat
            for name, function in cases.items():
                times[name].append(best(function, 1))
        row = {"updates": n, "bytes_per_update": int(buffers[0].numel() * 4),
               "seconds": {name: min(t) for name, t in times.items()}}
        s = row["seconds"]
        row["ratios"] = {"fedavg_vs_memory_read": s["fedavg"] / s["memory_read"],
                         "lora_exact_vs_fedavg": s["lora_exact"] / s["fedavg"],
                         "fedadam_vs_fedavg": s["fedadam"] / s["fedavg"]}
        row["fedavg_gb_per_s"] = n * row["bytes_per_update"] / s["fedavg"] / 1e9
        row["memory_read_gb_per_s"] = n * row["bytes_per_update"] / s["memory_read"] / 1e9
        if flower_aggregate is not None:
            row["ratios"]["flower_vs_fedavg"] = s["flower_aggregate"] / s["fedavg"]
            ours = FedAvg(adapter_config=config, order="submission").aggregate_train(start, weighted)
            theirs = flower_aggregate(arrays)
            row["max_abs_difference_vs_flower"] = float(max(np.max(np.abs(ours[k].numpy() - t))
                                                            for k, t in zip(sorted(ours), theirs)))
        rows.append(row)
        log(f"  N={n}: " + ", ".join(f"{k} {v:.4f} s" for k, v in s.items()))
    return {"flower": flower, "rows": rows, "verification": verification(args)}


def verification(args) -> dict:
    """Verifying one SmolLM2-shaped update against sha256 + safetensors load of its bytes."""
    from safetensors.torch import load

    from fednode.flat import concat
    from fednode.learning.settings import LoraSettings
    from fednode.protocol.ledger import ParticipantRecord
    from fednode.protocol.packaging import adapter_metadata, pack_adapter
    from fednode.protocol.rules import FederationRules
    from fednode.protocol.verify import Reason, RoundContext, verify_bytes
    from chain.events import UpdateSubmitted
    from fednode.storage.cid import cid_digest, cid_of

    lora = LoraSettings().to_json()
    start, (update,) = smollm2_updates(1, seed=1)
    start = concat(start)  # as the aggregator holds it: unpacked from its file
    rules = FederationRules(base_model="ab" * 32, lora=lora)
    node = "0x" + "11" * 20
    data = pack_adapter(update, adapter_metadata("fed", 1, node, rules.base_model, lora, "update"))
    sub = UpdateSubmitted(5, "0x", 1, node, 0, cid_digest(cid_of(data)), hashlib.sha256(data).digest(), 16, b"")
    ctx = RoundContext("fed", 1, rules, start, {node: ParticipantRecord(node, b"", b"", 1, 2)}, 5)
    assert verify_bytes(sub, data, ctx).reason == Reason.ACCEPTED
    cases = {"sha256_and_load": lambda: (hashlib.sha256(data).digest(), load(data)),
             "sha256_cid_and_load": lambda: (hashlib.sha256(data).digest(), cid_of(data), load(data)),
             "verify_bytes": lambda: verify_bytes(sub, data, ctx)}
    times = {name: [] for name in cases}
    for _ in range(max(5, args.repeats * 3)):
        for name, function in cases.items():
            times[name].append(best(function, 1))
    s = {name: min(t) for name, t in times.items()}
    return {"bytes": len(data), "seconds": s, "ratio_vs_sha256_and_load": s["verify_bytes"] / s["sha256_and_load"],
            "ratio_vs_sha256_cid_and_load": s["verify_bytes"] / s["sha256_cid_and_load"]}


def targets(result: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met."""
    out = []

    def check(name: str, value: float, limit: float, below: bool = True) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": value < limit if below else value >= limit})

    def worst(row: dict) -> float:
        return max(row["first_round"]["aggregator_round_s"], row["last_round"]["aggregator_round_s"])

    for chain, rows in result.get("round", {}).items():
        by_n = {r["hospitals"]: r for r in rows}
        big, small = max(by_n), min(n for n in by_n if n >= 10) if any(n >= 10 for n in by_n) else min(by_n)
        check(f"{chain}: aggregator round at {big} hospitals (s)", worst(by_n[big]),
              5.0 if chain == "embedded" else 2.0)
        check(f"{chain}: aggregator round per hospital, {big} vs {small} hospitals (linear: ~1)",
              (worst(by_n[big]) / big) / (worst(by_n[small]) / small), 1.5)
        check(f"{chain}: per-submission cost, {big} vs {min(by_n)} hospitals (linear: ~1)",
              by_n[big]["first_round"]["per_submission_s"] / by_n[min(by_n)]["first_round"]["per_submission_s"], 1.5)
        if "audit_s" in by_n[big]:
            check(f"{chain}: audit of {by_n[big]['rounds']} rounds x {big} hospitals (s)", by_n[big]["audit_s"], 30.0)
    kernels = result.get("kernels")
    if kernels:
        last = kernels["rows"][-1]
        if "flower_vs_fedavg" in last["ratios"]:
            check(f"Flower aggregate / FedAvg time at {last['updates']} updates", last["ratios"]["flower_vs_fedavg"],
                  2.0, below=False)
        check(f"FedAvg / memory read at {last['updates']} updates", last["ratios"]["fedavg_vs_memory_read"], 2.0)
        check("lora_exact / FedAvg, worst N", max(r["ratios"]["lora_exact_vs_fedavg"] for r in kernels["rows"]), 5.0)
        check("verification / (sha256 + safetensors load)", kernels["verification"]["ratio_vs_sha256_and_load"], 1.5)
    return out


def receipts(row: dict) -> str:
    lookup = row.get("receipt_lookup_s")
    return f"{lookup['indexed'] * 1e3:.2f} / {lookup['eth_tester_scan'] * 1e3:.2f}" if lookup else "–"


def tables(result: dict) -> str:
    """Markdown tables of the run (what the README quotes)."""
    lines = []
    if "round" in result:
        lines += ["| chain | hospitals | events | per submission (ms) | aggregator round, first / last (s) | "
                  "fresh history read (s) | receipt: indexed / eth-tester scan (ms) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for chain, rows in result["round"].items():
            for r in rows:
                first, last = r["first_round"], r["last_round"]
                lines.append(f"| {chain} | {r['hospitals']} | {r['events']} | {first['per_submission_s'] * 1e3:.1f} | "
                             f"{first['aggregator_round_s']:.2f} / {last['aggregator_round_s']:.2f} | "
                             f"{r['fresh_history_read_s']:.2f} | {receipts(r)} |")
        lines.append("")
    if "kernels" in result:
        lines += ["| updates | memory read | FedAvg | Flower aggregate | FedAdam | lora_exact | FedAvg / memory | "
                  "Flower / FedAvg | lora_exact / FedAvg |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["kernels"]["rows"]:
            s, q = r["seconds"], r["ratios"]
            flower = f"{s['flower_aggregate']:.4f}" if "flower_aggregate" in s else "–"
            lines.append(f"| {r['updates']} | {s['memory_read']:.4f} | {s['fedavg']:.4f} | {flower} | "
                         f"{s['fedadam']:.4f} | {s['lora_exact']:.3f} | {q['fedavg_vs_memory_read']:.1f} | "
                         f"{q.get('flower_vs_fedavg', float('nan')):.2f} | {q['lora_exact_vs_fedavg']:.1f} |")
        v = result["kernels"]["verification"]
        ms = {name: t * 1e3 for name, t in v["seconds"].items()}
        lines += ["", f"verification of one {v['bytes'] / 1e6:.2f} MB update: {ms['verify_bytes']:.1f} ms; sha256 + "
                      f"safetensors load {ms['sha256_and_load']:.1f} ms (ratio {v['ratio_vs_sha256_and_load']:.2f}); "
                      f"with the CID too {ms['sha256_cid_and_load']:.1f} ms (ratio "
                      f"{v['ratio_vs_sha256_cid_and_load']:.2f})", ""]
    lines += ["| target | value | limit | met |", "|---|---:|---:|---|"]
    lines += [f"| {t['target']} | {t['value']:.3g} | {t['limit']:g} | {'yes' if t['met'] else 'no'} |"
              for t in result["targets"]]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    root = RESULTS.parent.parent
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)  # noqa: E731
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads": args.threads}, "config": vars(args) | {
        "out": _shown(args.out), "skip": sorted(args.skip)}}
    if "kernels" not in args.skip:
        log("kernels (SmolLM2-shaped updates)")
        result["kernels"] = kernels(args, log)
    if "round" not in args.skip:
        log("a whole round (tiny adapters)")
        result["round"] = round_scale(args, log)
    result["targets"] = targets(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(tables(result))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
