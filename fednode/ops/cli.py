"""The `fedchain` console command."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from devstack.stack import BLOCK_TIME, SWARM_PORT

from ..protocol.methods import METHODS
from .console import EXIT_CODES, configure_logging, version


def signer_from_args(w3, args):
    """The account given by --keystore (password: --password-file, the environment or a prompt) or --dev-account N."""
    from chain.wallet import dev_account, load_keystore

    from .passwords import password_for

    if getattr(args, "keystore", None):
        if not Path(args.keystore).is_file():
            raise ValueError(f"keystore {args.keystore} not found")
        return load_keystore(Path(args.keystore), password_for(args.keystore, _password_file(args)))
    return dev_account(w3, args.dev_account)


def _password_file(args) -> Path | None:
    return Path(args.password_file) if getattr(args, "password_file", None) else None


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
    from chain.connection import EMBEDDED, connect
    from chain.deployment import deploy

    if args.rpc == EMBEDDED:
        print("note: --rpc embedded deploys to a throwaway in-process chain, gone when this command exits",
              file=sys.stderr)
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
    from ..learning.settings import TrainSettings
    from .demo import DemoConfig, run_demo

    if args.clients < 1 or args.rounds < 1:
        raise ValueError("--clients and --rounds must be at least 1")
    cfg = DemoConfig(model=args.model, clients=args.clients, rounds=args.rounds, partition=args.partition,
                     source=args.source, alpha=args.alpha, seed=args.seed, out=Path(args.out),
                     train=TrainSettings(steps=args.steps, seed=args.seed), method=args.method, submit=args.submit,
                     **({} if args.train_per_client is None else {"train_per_client": args.train_per_client}))
    run_demo(cfg)
    return 0


def cmd_init(args) -> int:
    from .scaffold import init_federation

    done = init_federation(Path(args.dir), args.hospitals, args.rpc, args.ipfs)
    for name, path in done.configs.items():
        print(f"wrote {path}")
    print(f"next: fedchain stack up, a wallet per config (fedchain wallet new --out {done.folder}/keys/admin.json, ...), "
          "then README 'The real stack'")
    return 0


def cmd_stack(args) -> int:
    from devstack import stack

    if args.stack_command == "up":
        if args.block_time < 0:
            raise ValueError(f"--block-time must be >= 0 seconds, got {args.block_time:g}")
        if args.ipfs_nodes < 1:
            raise ValueError(f"--ipfs-nodes must be at least 1, got {args.ipfs_nodes}")
        result = stack.up(Path(args.dir), args.anvil_port, args.ipfs_port, args.block_time,
                          ipfs_nodes=args.ipfs_nodes, swarm_port=args.ipfs_swarm_port)
        apis = ", ".join(f'"{node["api"]}"' for node in result.ipfs_nodes)
        print(f"stack up in {result.startup_seconds['total']:.1f} s: rpc = \"{result.rpc}\", "
              + (f"ipfs = \"{result.ipfs_api}\"" if args.ipfs_nodes == 1 else f"ipfs nodes = [{apis}]"))
    elif args.stack_command == "down":
        stack.down(Path(args.dir))
    else:
        health = stack.status(Path(args.dir))
        record = stack.Stack.record(Path(args.dir))
        urls = json.loads(record.read_text()) if record.is_file() else {}
        addresses = [urls.get("rpc"), urls.get("ipfs_api")] + [n["api"] for n in urls.get("ipfs_nodes", [])[1:]]
        for (name, ok), url in zip(health.items(), addresses, strict=True):
            print(f"{name:<6} {'up' if ok else 'down':<5} {url or 'not started here'}")
        return 0 if all(health.values()) else 1
    return 0


def cmd_wallet_new(args) -> int:
    from chain.wallet import new_keystore

    from .passwords import password_for

    if Path(args.out).exists():  # before asking for a password
        raise ValueError(f"{args.out} already exists; not overwriting a keystore")
    account = new_keystore(Path(args.out), password_for(args.out, _password_file(args), confirm=True))
    print(f"{account.address}  (keystore {args.out})")
    return 0


def cmd_wallet_fund(args) -> int:
    from chain.connection import connect
    from chain.wallet import dev_account, fund

    w3 = connect(args.rpc)
    fund(w3, dev_account(w3, args.dev_account), args.to, int(args.ether * 10**18))
    print(f"sent {args.ether} ETH to {args.to}; balance {w3.eth.get_balance(args.to) / 10**18:g} ETH")
    return 0


def _participant(args, outage_seconds: float | None = None):
    from .config import load_config
    from .participant import Participant

    return Participant(load_config(args.config), outage_seconds)


def cmd_status(args) -> int:
    from .status import federation_status

    status = federation_status(_participant(args, outage_seconds=args.timeout))
    print(status.to_json() if args.json else status.text())
    return 0 if status.storage["up"] else 1


def cmd_node_join(args) -> int:
    from ..protocol.node import Node

    p = _participant(args)
    node = Node(p.federation, p.store, None, p.client, p.rules, p.config.train,
                adapter_config=p.config.adapter_config)
    receipt = node.join({"description": args.description} if args.description else None)
    print(f"{node.address} joined as {p.client.name}: model identity 0x{node.model_id.hex()} "
          f"(tx {receipt.tx_hash}, gas {receipt.gas_used:,}); waiting for an admin to approve it")
    return 0


def cmd_admin(args) -> int:
    p = _participant(args)
    if args.admin_command == "approve":
        receipt = p.federation.approve(args.address)
    elif args.admin_command == "revoke":
        receipt = p.federation.revoke(args.address, args.reason)
    elif args.admin_command == "rules":
        from ..protocol.publish import publish_bytes

        publish_bytes(p.store, p.rules.to_bytes())
        receipt = p.federation.change_rules(p.rules.digest())
        print(f"rules changed to {p.rules.digest().hex()} ([federation] of {p.config.path}; tx {receipt.tx_hash}, "
              f"gas {receipt.gas_used:,}); the next round opens under them")
        return 0
    elif args.admin_command == "transfer":
        receipt = p.federation.begin_admin_transfer(args.address)
        print(f"admin transfer to {args.address} started (tx {receipt.tx_hash}); it accepts with `fedchain admin "
              "accept` once the contract's delay has passed")
        return 0
    elif args.admin_command == "accept":
        receipt = p.federation.accept_admin_transfer()
        print(f"{p.federation.address} is now the admin (tx {receipt.tx_hash})")
        return 0
    else:  # read-only: no wallet, no password
        from ..protocol.ledger import Ledger

        fed = p.reader
        rows = [{"address": r.address, "status": fed.participant(r.address).status.name.lower(),
                 "joined_block": r.joined_block, "model_id": "0x" + r.model_id.hex()}
                for r in Ledger(fed).refresh().participants.values()]
        for row in rows if not args.json else ():
            print(f"{row['address']}  {row['status']:<8} joined at block {row['joined_block']}  "
                  f"model {row['model_id'][:18]}…")
        if args.json:
            print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.admin_command}d {args.address} (tx {receipt.tx_hash}, gas {receipt.gas_used:,})")
    return 0


def cmd_round_open(args) -> int:
    from ..protocol.aggregator import Aggregator
    from .service import clock

    p = _participant(args)
    f = p.config.federation
    agg = Aggregator(p.federation, p.store, p.rules)
    latest = agg.ledger.refresh().latest_round()
    if latest is None:
        _, cid_digest, sha = agg.publish_global(0, p.global_trainer.initial_state(f.seed))
    else:
        cid_digest, sha = latest.next_base
    rec = agg.open_round(cid_digest, sha, f.round_seconds, f.min_updates, f.allow_below_quorum)
    print(f"round {rec.round_id} opened (deadline {clock(rec.deadline)}, tx {rec.opened_tx})")
    return 0


def _run_service(args, service) -> int:
    import signal

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    service(_participant(args))
    return 0


def cmd_node_run(args) -> int:
    from .service import run_node

    return _run_service(args, run_node)


def cmd_aggregator_run(args) -> int:
    from .service import run_aggregator

    return _run_service(args, run_aggregator)


def cmd_adapter_export(args) -> int:
    from .export import export_round

    done = export_round(_participant(args), args.round, Path(args.out), audit=not args.no_audit)
    if args.json:
        print(json.dumps({"round": done.round_id, "cid": done.cid, "out": str(done.out_dir), "audit": done.audit}))
        return 0
    print(f"round {done.round_id} global adapter {done.cid} written to {done.out_dir} ({done.audit})")
    print(f"load it with AutoPeftModelForCausalLM.from_pretrained(\"{done.out_dir}\"), or try it: "
          f"fedchain generate --adapter {done.out_dir} \"ICD-10-CM code E11.9 means:\"")
    return 0


def cmd_generate(args) -> int:
    from .generate import generate

    print(args.prompt + generate(Path(args.adapter), args.prompt, args.max_new_tokens))
    return 0


def cmd_audit(args) -> int:
    from chain.connection import EMBEDDED, connect
    from chain.deployment import Deployment

    from ..audit import run_audit, save_report
    from ..storage import open_storage

    if args.rpc == EMBEDDED:
        raise ValueError("--rpc embedded would audit a fresh, empty chain: give the JSON-RPC URL of the federation's "
                         "chain (`fedchain demo` audits its own embedded chain)")
    if args.store and not Path(args.store).is_dir():
        raise ValueError(f"store directory {args.store} not found")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    w3 = connect(args.rpc)
    deployment = Deployment.load(Path(args.deployment))
    deployment.check_chain(w3)
    spec = args.ipfs or (f"embedded:{args.store}" if args.store else None)
    store = None if spec is None else open_storage(spec, timeout_s=args.timeout, outage_s=args.timeout)
    report = run_audit(w3, deployment, store, verify=args.verify, page=args.page)
    save_report(report, args.json, args.html)
    for path in (args.json, args.html):
        if path:
            print(f"wrote {path}")
    print(report.table())
    return report.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedchain", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fedchain {version()}")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="debug notices, and a traceback on errors")
    loud.add_argument("-q", "--quiet", action="store_true", help="results and errors only (no progress or notices)")
    sub = parser.add_subparsers(dest="command", required=True)

    chain = sub.add_parser("chain", help="compile, deploy and inspect the contracts").add_subparsers(
        dest="chain_command", required=True)
    p = chain.add_parser("compile", help="compile contracts/ into chain/artifacts")
    p.add_argument("--check", action="store_true", help="fail if the committed artifacts are stale")
    p.add_argument("--no-recompile", action="store_true", help="with --check: compare source digests only")
    p.set_defaults(func=cmd_chain_compile)

    p = chain.add_parser("deploy", help="deploy the Federation contract")
    p.add_argument("--rpc", required=True, help="JSON-RPC URL (`fedchain stack up` prints it), or 'embedded' for a "
                                                "throwaway in-process chain")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--keystore", help="geth v3 keystore of the deployer")
    who.add_argument("--dev-account", type=int, default=0, help="index of a local dev chain's funded account")
    p.add_argument("--password-file", help="the keystore's password on the first line (else "
                   "$FEDCHAIN_PASSWORD_<KEYSTORE NAME>, $FEDCHAIN_PASSWORD or a prompt)")
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
    p.add_argument("--steps", type=int, default=20, help="local training steps per round")
    p.add_argument("--train-per-client", type=int,
                   help="training examples per hospital (default 64: alone a hospital overfits so few, federated it "
                        "much less)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="fedavg", choices=list(METHODS),
                   help="federated method: aggregation rule, client objective, privacy, adapter type "
                        "(see fednode/protocol/methods.py)")
    p.add_argument("--submit", default="direct", choices=["direct", "relay"],
                   help="direct: each hospital sends its updates; relay: hospitals sign them (no ether), the "
                        "aggregator relays them in one batch per round")
    p.add_argument("--out", default="out/demo", help="output folder (report.json, adapters/, store/)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("status", help="where a federation stands: current round, deadline, submissions, last global "
                                      "adapter, chain and storage health (no wallet needed)",
                       epilog="exit status: 0 chain and storage answer, 1 storage does not, 2 the chain does not")
    p.add_argument("--config", required=True, help="any participant's config")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an unreachable chain or storage")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("init", help="write an example federation's configs (admin, aggregator, hospitals), every "
                                    "key commented with its default")
    p.add_argument("dir", help="folder to write (existing configs are never overwritten)")
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--rpc", default="http://127.0.0.1:8545", help="the chain's JSON-RPC URL")
    p.add_argument("--ipfs", default="http://127.0.0.1:5001", help="the IPFS API address")
    p.set_defaults(func=cmd_init)

    stack = sub.add_parser("stack", help="a local anvil + IPFS node(s) on 127.0.0.1").add_subparsers(
        dest="stack_command", required=True)
    for name, text in (("up", "start both, health-checked"), ("down", "stop both by pid"),
                       ("status", "health of both")):
        p = stack.add_parser(name, help=text)
        p.add_argument("--dir", default=".stack", help="state, logs and pid files")
        if name == "up":
            p.add_argument("--anvil-port", type=int, default=8545)
            p.add_argument("--ipfs-port", type=int, default=5001, help="the first IPFS node's API port (node i: +i)")
            p.add_argument("--ipfs-nodes", type=int, default=1,
                           help="IPFS nodes to start: 1 is offline; more are peered over a swarm on 127.0.0.1")
            p.add_argument("--ipfs-swarm-port", type=int, default=SWARM_PORT,
                           help="the first node's swarm port when --ipfs-nodes > 1 (node i: +i)")
            p.add_argument("--block-time", type=float, default=BLOCK_TIME,
                           help="seconds between anvil's blocks (0: mine only when a transaction arrives)")
        p.set_defaults(func=cmd_stack)

    wallet = sub.add_parser("wallet", help="keystores and local funding").add_subparsers(
        dest="wallet_command", required=True)
    p = wallet.add_parser("new", help="write an encrypted geth-style keystore")
    p.add_argument("--out", required=True, help="keystore file to create")
    p.add_argument("--password-file", help="the password on the first line (else $FEDCHAIN_PASSWORD_<KEYSTORE NAME>, "
                   "$FEDCHAIN_PASSWORD or a prompt, asked twice)")
    p.set_defaults(func=cmd_wallet_new)
    p = wallet.add_parser("fund", help="send ETH from a dev account (local chains only)")
    p.add_argument("--rpc", required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--ether", type=float, default=10.0)
    p.add_argument("--dev-account", type=int, default=0)
    p.set_defaults(func=cmd_wallet_fund)

    node = sub.add_parser("node", help="a hospital node").add_subparsers(dest="node_command", required=True)
    p = node.add_parser("join", help="register this node's wallet and model identity")
    p.add_argument("--config", required=True)
    p.add_argument("--description", help="free text for the model card")
    p.set_defaults(func=cmd_node_join)
    p = node.add_parser("run", help="follow the rounds: train, publish and submit an update to each")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_node_run)

    admin = sub.add_parser("admin", help="approve, revoke and list participants, change the rules, hand over the "
                                         "admin role").add_subparsers(dest="admin_command", required=True)
    for name, text in (("approve", "approve a joined node"), ("revoke", "revoke a node"),
                       ("participants", "list the participants"),
                       ("rules", "make this config's [federation] section the rules of the next rounds"),
                       ("transfer", "start handing the admin role to ADDRESS (it accepts after the delay)"),
                       ("accept", "accept the admin role handed to this wallet")):
        p = admin.add_parser(name, help=text)
        p.add_argument("--config", required=True)
        if name in ("approve", "revoke", "transfer"):
            p.add_argument("address")
        else:
            p.add_argument("--json", action="store_true", help="print the participants as JSON")
        if name == "revoke":
            p.add_argument("--reason", type=int, default=1, help="reason code recorded on-chain")
        p.set_defaults(func=cmd_admin)

    rnd = sub.add_parser("round", help="open a round by hand").add_subparsers(dest="round_command", required=True)
    p = rnd.add_parser("open", help="open the next round from the latest global adapter")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_round_open)

    agg = sub.add_parser("aggregator", help="the aggregator").add_subparsers(dest="agg_command", required=True)
    p = agg.add_parser("run", help="verify, merge, finalize and open rounds until the federation ends")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_aggregator_run)

    adapter = sub.add_parser("adapter", help="the federation's global adapter as a model").add_subparsers(
        dest="adapter_command", required=True)
    p = adapter.add_parser("export", help="write a finalized round's global adapter as a Hugging Face PEFT folder "
                                          "(tokenizer, base model, model card), checked against the chain")
    p.add_argument("--config", required=True, help="any participant's config (no wallet or password needed)")
    p.add_argument("--round", type=int, help="round number (default: the last finalized round)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--no-audit", action="store_true", help="skip re-verifying the history for the model card")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_adapter_export)

    p = sub.add_parser("generate", help="continue a prompt with an exported adapter (offline)")
    p.add_argument("--adapter", required=True, help="folder written by `fedchain adapter export`")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("audit", help="rebuild and re-check the federation's whole history from the chain and storage",
                       epilog="exit status: 0 every round checks out, 1 a round is MISMATCH or UNAVAILABLE, 2 the "
                              "audit could not run, 3 nothing failed but the last round is still open")
    p.add_argument("--rpc", required=True, help="JSON-RPC URL of the federation's chain")
    p.add_argument("--deployment", required=True, help="deployment record (JSON)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--ipfs", help="IPFS HTTP API address, e.g. http://127.0.0.1:5001")
    where.add_argument("--store", help="embedded store directory (e.g. out/demo/store)")
    p.add_argument("--verify", action="store_true",
                   help="fetch every update and global adapter, re-run verification and aggregation, compare the "
                        "results bit for bit")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--html", help="write a self-contained HTML report here")
    p.add_argument("--page", type=int, default=2000, help="blocks per get_logs request")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for one stored object, and to ride out an unreachable IPFS node, before "
                        "marking what needs it UNAVAILABLE")
    p.set_defaults(func=cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("fedchain: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"fedchain: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
