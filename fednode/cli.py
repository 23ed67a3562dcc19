"""The `fedchain` console command."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def signer_from_args(w3, args):
    """The account given by --keystore (password from FEDCHAIN_PASSWORD or a prompt) or --dev-account N."""
    from chain.wallet import dev_account, load_keystore

    from .participant import password_for

    if getattr(args, "keystore", None):
        if not Path(args.keystore).is_file():
            raise ValueError(f"keystore {args.keystore} not found")
        return load_keystore(Path(args.keystore), password_for(args.keystore))
    return dev_account(w3, args.dev_account)


def cmd_chain_compile(args) -> int:
    from chain import compiler

    if args.check:
        problems = compiler.check(recompile=not args.no_recompile)
        for problem in problems:
            print(f"stale: {problem}", file=sys.stderr)
        if problems:
            return 1
        print("artifacts are up to date")
        return 0
    used, written = compiler.compile_contracts()
    print(f"compiled with solc {compiler.SOLC_VERSION} ({used.kind})")
    for path in written:
        print(f"  wrote {path.relative_to(compiler.project_root())}")
    return 0


def cmd_chain_deploy(args) -> int:
    from chain.connection import connect
    from chain.deployment import deploy

    w3 = connect(args.rpc)
    deployment = deploy(w3, signer_from_args(w3, args), args.aggregator)
    for name, c in deployment.contracts.items():
        print(f"{name}: {c.address}  (tx {c.tx_hash[:12]}…, block {c.block_number}, gas {c.gas_used:,})")
    print(f"chain id {deployment.chain_id}, deployer {deployment.deployer}, aggregator {deployment.aggregator}")
    if args.out:
        deployment.save(Path(args.out))
        print(f"deployment record written to {args.out}")
    else:
        print(json.dumps({n: c.address for n, c in deployment.contracts.items()}))
    return 0


def cmd_chain_events(args) -> int:
    from chain.clients import Federation
    from chain.connection import connect
    from chain.deployment import Deployment

    w3 = connect(args.rpc)
    deployment = Deployment.load(Path(args.deployment))
    deployment.check_chain(w3)
    for event in Federation(w3, deployment).events(page=args.page):
        fields = ", ".join(f"{k}={'0x' + v.hex() if isinstance(v, bytes) else v}" for k, v in event.args.items())
        print(f"block {event.block_number:>6}  {event.name:<16} {fields}")
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo
    from .training import TrainSettings

    if args.clients < 1 or args.rounds < 1:
        raise ValueError("--clients and --rounds must be at least 1")
    cfg = DemoConfig(model=args.model, clients=args.clients, rounds=args.rounds, partition=args.partition,
                     source=args.source, alpha=args.alpha, seed=args.seed, out=Path(args.out),
                     train=TrainSettings(steps=args.steps, seed=args.seed))
    run_demo(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedchain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    chain = sub.add_parser("chain", help="compile, deploy and inspect the contracts").add_subparsers(
        dest="chain_command", required=True)
    p = chain.add_parser("compile", help="compile contracts/ into chain/artifacts")
    p.add_argument("--check", action="store_true", help="fail if the committed artifacts are stale")
    p.add_argument("--no-recompile", action="store_true", help="with --check: compare source digests only")
    p.set_defaults(func=cmd_chain_compile)

    p = chain.add_parser("deploy", help="deploy the Federation contract")
    p.add_argument("--rpc", default="embedded", help="'embedded' (in-process chain) or a JSON-RPC URL")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--keystore", help="geth v3 keystore of the deployer (password: $FEDCHAIN_PASSWORD or prompt)")
    who.add_argument("--dev-account", type=int, default=0, help="index of a local dev chain's funded account")
    p.add_argument("--aggregator", help="address granted the aggregator role (default: the deployer)")
    p.add_argument("--out", help="write the deployment record (JSON) here")
    p.set_defaults(func=cmd_chain_deploy)

    p = chain.add_parser("events", help="list the federation's events in chain order")
    p.add_argument("--rpc", required=True)
    p.add_argument("--deployment", required=True)
    p.add_argument("--page", type=int, default=2000, help="blocks per get_logs request")
    p.set_defaults(func=cmd_chain_events)

    p = sub.add_parser("demo", help="a whole federation on the embedded chain and store, in one process")
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    p.add_argument("--clients", type=int, default=3, help="number of hospitals")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--partition", default="natural", choices=["natural", "dirichlet"])
    p.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration (with --partition dirichlet)")
    p.add_argument("--source", default="icd10", choices=["icd10", "drugs", "mixed"])
    p.add_argument("--steps", type=int, default=30, help="local training steps per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/demo", help="output folder (report.json, adapters/, store/)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("fedchain: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        if os.environ.get("FEDCHAIN_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"fedchain: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
