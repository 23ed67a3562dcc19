"""Gas used by each Federation transaction on the embedded chain and on a real anvil, checked against targets.

    python scripts/bench_gas.py [--nodes 64] [--out scripts/results/gas.json]

Direct submissions, and EIP-712-signed updates relayed in batches of 1, 8 and 64 (gas per update = the batch's gas
over its size).

Starts (and stops) its own anvil on a free port. Prints a side-by-side table, writes the numbers as JSON and exits
1 if any target fails on either chain. Gas is deterministic: the keys, digests and call order are fixed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import socket
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from chain.clients import Federation
from chain.compiler import load_artifact
from chain.connection import EMBEDDED, connect, is_embedded
from chain.deployment import deploy
from chain.signing import UpdateFields
from chain.wallet import dev_account, fund
from devstack import anvil

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gas.json"
FEW = 4  # accepted updates in the small round
BATCHES = (1, 8, 64)  # relayed batch sizes
NODE_FUNDING_WEI = 10**18
ROUND_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Target:
    name: str
    metric: str
    low: float | None = None
    high: float | None = None

    def passes(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


def targets(nodes: int) -> tuple[Target, ...]:
    relayed = (Target(f"relayed per update, batch {BATCHES[-1]} <= 35,000", f"relay_{BATCHES[-1]}_per_update",
                      high=35_000),) if nodes >= BATCHES[-1] else ()
    return (
        Target("submitUpdate <= 60,000", "submit_max", high=60_000),
        *relayed,
        Target("join + approve <= 150,000", "join_approve_max", high=150_000),
        Target("finalize <= 100,000", "finalize_max", high=100_000),
        Target(f"|finalize {nodes}/{FEW} - 1| <= 10%", "finalize_ratio", low=0.9, high=1.1),
    )


def digest(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def node_account(index: int) -> LocalAccount:
    return Account.from_key(digest(f"fedchain bench node {index}"))


def open_round(aggregator: Federation, quorum: int = FEW) -> tuple[int, int]:
    """Open a round as the aggregator from the lineage head under the federation's rules; its id and gas."""
    round_id, receipt = aggregator.open_round(*aggregator.lineage_head(), aggregator.rules_digest(),
                                              aggregator.chain_time() + ROUND_SECONDS, quorum,
                                              allow_below_quorum=False)
    return round_id, receipt.gas_used


def relay(aggregator: Federation, clients: list[Federation], size: int) -> int:
    """Gas of one batch of `size` signed updates relayed by the aggregator, in a round of its own."""
    round_id, _ = open_round(aggregator, quorum=1)
    signed = [c.sign_update(UpdateFields(round_id, digest(f"cid {round_id} {c.address}"),
                                         digest(f"sha {round_id} {c.address}"), 1000, digest(f"metrics {c.address}")))
              for c in clients[:size]]
    gas = aggregator.submit_signed_batch(round_id, signed).gas_used
    finalize(aggregator, round_id, size)
    return gas


def submit(node: Federation, round_id: int) -> int:
    return node.submit_update(round_id, digest(f"cid {round_id} {node.address}"),
                              digest(f"sha {round_id} {node.address}"), 1000, digest(f"metrics {node.address}")).gas_used


def finalize(aggregator: Federation, round_id: int, accepted: int) -> int:
    return aggregator.finalize(round_id, digest(f"global {round_id}"), digest(f"global sha {round_id}"),
                               bytes(accepted)).gas_used


def measure(w3: Web3, nodes: int) -> dict[str, float]:
    """Deploy, register `nodes` funded accounts, run a round of `nodes` updates and one of FEW, then relayed
    batches; gas per step."""
    admin_account, aggregator_account = dev_account(w3, 0), dev_account(w3, 9)
    deployment = deploy(w3, admin_account, aggregator_account.address)
    accounts = [node_account(i) for i in range(nodes)]
    for account in accounts:
        fund(w3, admin_account, account.address, NODE_FUNDING_WEI)
    admin = Federation(w3, deployment, admin_account)
    aggregator = admin.as_account(aggregator_account)
    clients = [admin.as_account(account) for account in accounts]

    joins = [c.join(digest(f"model {i}"), digest(f"card {i}")).gas_used for i, c in enumerate(clients)]
    approves = [admin.approve(c.address).gas_used for c in clients]
    configure = aggregator.configure(digest("initial cid"), digest("initial sha"), digest("rules")).gas_used
    big_round, open_first = open_round(aggregator)
    submits = [submit(c, big_round) for c in clients]
    finalize_many = finalize(aggregator, big_round, nodes)
    small_round, open_later = open_round(aggregator)
    for c in clients[:FEW]:
        submit(c, small_round)
    finalize_few = finalize(aggregator, small_round, FEW)
    relayed = {size: relay(aggregator, clients, size) for size in BATCHES if size <= nodes}
    steady = submits[1:]
    return {
        "deploy": deployment.contracts["Federation"].gas_used,
        "configure": configure,
        "join_max": max(joins),
        "approve_max": max(approves),
        "join_approve_max": max(j + a for j, a in zip(joins, approves)),
        "open_round_first": open_first,
        "open_round_later": open_later,
        "submit_first_in_round": submits[0],
        "submit_steady_mean": round(statistics.fmean(steady), 1),
        "submit_steady_max": max(steady),
        "submit_max": max(submits),
        f"finalize_{FEW}_accepted": finalize_few,
        f"finalize_{nodes}_accepted": finalize_many,
        "finalize_max": max(finalize_few, finalize_many),
        "finalize_ratio": round(finalize_many / finalize_few, 4),
        **{f"relay_{size}_batch": gas for size, gas in relayed.items()},
        **{f"relay_{size}_per_update": round(gas / size, 1) for size, gas in relayed.items()},
    }


def chain_info(w3: Web3) -> dict:
    info = {"chain_id": w3.eth.chain_id, "client": w3.client_version}
    if is_embedded(w3):
        info["evm"] = type(w3.provider.ethereum_tester.backend.chain.get_vm()).__name__
    else:
        info["evm"] = w3.provider.make_request("anvil_nodeInfo", [])["result"]["hardFork"]
    return info


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(nodes: int) -> dict:
    chains = {}
    w3 = connect(EMBEDDED)
    chains["embedded"] = {**chain_info(w3), "gas": measure(w3, nodes)}
    with tempfile.TemporaryDirectory(prefix="bench-anvil-") as state_dir:
        handle = anvil.start(Path(state_dir), port=free_port())
        try:
            w3 = connect(handle.url)
            chains["anvil"] = {**chain_info(w3), "gas": measure(w3, nodes)}
        finally:
            anvil.stop(Path(state_dir))
    checks = [{**asdict(t), "results": {name: {"value": c["gas"][t.metric], "pass": t.passes(c["gas"][t.metric])}
                                        for name, c in chains.items()}} for t in targets(nodes)]
    artifact = load_artifact("Federation")
    return {
        "compiler": artifact["compiler"],
        "source_digest": artifact["sourceDigest"],
        "nodes": nodes,
        "chains": chains,
        "targets": checks,
        "passed": all(r["pass"] for check in checks for r in check["results"].values()),
    }


def _fmt(value: float) -> str:
    return f"{value:,.4f}" if isinstance(value, float) and value < 10 else f"{value:,}"


def table(report: dict) -> str:
    chains = report["chains"]
    names = list(chains)
    rows = [("", *names),
            ("chain id", *(str(chains[n]["chain_id"]) for n in names)),
            ("evm", *(chains[n]["evm"] for n in names))]
    rows += [(metric, *(_fmt(chains[n]["gas"][metric]) for n in names)) for metric in chains[names[0]]["gas"]]
    rows += [("target", *("" for _ in names))]
    rows += [(check["name"], *(("PASS " if check["results"][n]["pass"] else "FAIL ") + _fmt(check["results"][n]["value"])
                               for n in names)) for check in report["targets"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(names) + 1)]
    return "\n".join("  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))])
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=64, help=f"nodes in the big round (> {FEW}; at least "
                                                               f"{BATCHES[-1]} for every relayed batch size)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON report")
    args = parser.parse_args(argv)
    if args.nodes <= FEW:
        parser.error(f"--nodes must be more than {FEW}")
    report = run(args.nodes)
    compiler = report["compiler"]
    print(f"solc {compiler['version']}, optimizer runs {compiler['settings']['optimizer']['runs']}, "
          f"evm {compiler['settings']['evmVersion']}; {args.nodes} nodes")
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'all targets met' if report['passed'] else 'TARGETS FAILED'}; wrote {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
