"""Run the README's newcomer flow end to end on a fresh local stack, as its commands are shown, and print every
command with its real output and wall time: `fedchain init`, `stack up`, wallets, deploy, join and approve three
hospitals, the aggregator and the nodes in the background, `status`, `audit --verify`, `adapter export`,
`generate` and the offline `AutoPeftModelForCausalLM` load. The README's sample outputs are copied from its
output (`python scripts/readme_flow.py --out /tmp/flow`); `--anvil-port` / `--ipfs-port` keep it off a stack
already running on the defaults."""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEDCHAIN = str(Path(sys.executable).with_name("fedchain"))
ROLES = ["admin", "aggregator", "hospital-0", "hospital-1", "hospital-2"]
LOAD = """from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained("adapter")
tokenizer = AutoTokenizer.from_pretrained("adapter")
ids = tokenizer("ICD-10-CM code E11.9 means:", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.3)
print(tokenizer.decode(out[0], skip_special_tokens=True))"""


class Flow:
    def __init__(self, work: Path, env: dict):
        self.work, self.env, self.times = work, env, []

    def run(self, *args: str, background: bool = False, show: str | None = None):
        """Run `fedchain ARGS` (or a shell line) in the work folder; prints the command and its output."""
        line = show or "fedchain " + " ".join(shlex.quote(a) for a in args)
        cmd = [FEDCHAIN, *args]
        print(f"$ {line}{' &' if background else ''}", flush=True)
        if background:
            name = args[0] + "-" + Path(args[-1]).stem
            return subprocess.Popen(cmd, stdout=open(self.work / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env, cwd=self.work), self.work / f"{name}.log"
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.work,
                              stdin=subprocess.DEVNULL, timeout=900)
        seconds = time.perf_counter() - started
        self.times.append((line, seconds))
        print((proc.stdout + proc.stderr).rstrip(), flush=True)
        if proc.returncode not in (0,):
            raise SystemExit(f"README flow failed at `{line}` (exit {proc.returncode})")
        return proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="an empty work folder")
    parser.add_argument("--anvil-port", type=int, default=8545)
    parser.add_argument("--ipfs-port", type=int, default=5001)
    args = parser.parse_args()
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           **{f"FEDCHAIN_PASSWORD_{r.upper().replace('-', '_')}": f"pw-{r}" for r in ROLES}}
    rpc, ipfs = f"http://127.0.0.1:{args.anvil_port}", f"http://127.0.0.1:{args.ipfs_port}"
    flow = Flow(work, env)
    total = time.perf_counter()
    ports = [] if args.anvil_port == 8545 and args.ipfs_port == 5001 else [
        "--rpc", rpc, "--ipfs", ipfs]
    flow.run("init", "fed", *ports)
    flow.run("stack", "up", "--dir", ".stack", *([] if not ports else ["--anvil-port", str(args.anvil_port),
                                                                        "--ipfs-port", str(args.ipfs_port)]))
    try:
        address = {}
        for role in ROLES:
            address[role] = flow.run("wallet", "new", "--out", f"fed/keys/{role}.json").split()[0]
            flow.run("wallet", "fund", "--rpc", rpc, "--to", address[role], "--ether", "10")
        flow.run("chain", "deploy", "--rpc", rpc, "--keystore", "fed/keys/admin.json", "--aggregator",
                 address["aggregator"], "--out", "fed/deployment.json")
        for i in range(3):
            flow.run("node", "join", "--config", f"fed/hospital-{i}.toml")
            flow.run("admin", "approve", "--config", "fed/admin.toml", address[f"hospital-{i}"])
        flow.run("admin", "participants", "--config", "fed/admin.toml")
        started = time.perf_counter()
        procs = [flow.run("aggregator", "run", "--config", "fed/aggregator.toml", background=True)]
        procs += [flow.run("node", "run", "--config", f"fed/hospital-{i}.toml", background=True) for i in range(3)]
        while "round 1 opened" not in procs[0][1].read_text():  # status while the first round runs
            if procs[0][0].poll() is not None:
                raise SystemExit(f"the aggregator exited:\n{procs[0][1].read_text()}")
            time.sleep(1)
        flow.run("status", "--config", "fed/admin.toml")
        for proc, log in procs:
            proc.wait(timeout=1800)
            print(f"--- {log.name}\n{log.read_text().rstrip()}", flush=True)
            if proc.returncode:
                raise SystemExit(f"{log.name}: exit {proc.returncode}")
        flow.times.append(("federation (aggregator + 3 nodes, 2 rounds)", time.perf_counter() - started))
        flow.run("status", "--config", "fed/admin.toml")
        flow.run("audit", "--rpc", rpc, "--deployment", "fed/deployment.json", "--ipfs", ipfs, "--verify")
        flow.run("adapter", "export", "--config", "fed/hospital-0.toml", "--out", "adapter")
        offline = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        flow.env = offline
        flow.run("generate", "--adapter", "adapter", "ICD-10-CM code E11.9 means:")
        print("$ HF_HUB_OFFLINE=1 python - <<'EOF'  (the README's snippet)", flush=True)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, env=offline, cwd=work,
                              timeout=600)
        flow.times.append(("AutoPeftModelForCausalLM load + generate", time.perf_counter() - started))
        print(proc.stdout.rstrip() or proc.stderr[-2000:], flush=True)
        if proc.returncode:
            raise SystemExit("the README's AutoPeftModelForCausalLM snippet failed")
    finally:
        flow.env = env
        flow.run("stack", "down", "--dir", ".stack")
    print("\nwall time per step:")
    for line, seconds in flow.times:
        print(f"  {seconds:7.1f} s  {line}")
    print(f"  {time.perf_counter() - total:7.1f} s  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
