"""Compile contracts/ into committed artifacts with a pinned solc, native when installed, solcjs otherwise.

Both compilers get the same standard-JSON input (every source inlined, OpenZeppelin imports resolved from
node_modules), so they produce the same bytecode. Artifacts carry the compiler version, settings and a digest of
the sources, so `check()` can tell a stale artifact without any compiler installed.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOLC_VERSION = "0.8.28"
CONTRACTS = ("Federation",)
SETTINGS = {
    "optimizer": {"enabled": True, "runs": 200},
    "evmVersion": "cancun",
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
}
ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"
_IMPORT = re.compile(r'^\s*import\s+(?:\{[^}]*\}\s+from\s+)?"([^"]+)"\s*;', re.MULTILINE)


class CompileError(RuntimeError):
    """The contracts could not be compiled, or an artifact is missing or stale."""


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def collect_sources(root: Path | None = None) -> dict[str, str]:
    """Every source unit reachable from contracts/*.sol, keyed by its source unit name."""
    root = root or project_root()
    search = [root, root / "node_modules"]
    sources: dict[str, str] = {}
    pending = sorted(str(p.relative_to(root)) for p in (root / "contracts").glob("*.sol"))
    if not pending:
        raise CompileError(f"no Solidity sources in {root / 'contracts'}")
    while pending:
        name = pending.pop()
        if name in sources:
            continue
        path = next((base / name for base in search if (base / name).is_file()), None)
        if path is None:
            raise CompileError(f"cannot resolve import {name!r}: run `npm ci` to install node_modules")
        text = path.read_text()
        sources[name] = text
        for imported in _IMPORT.findall(text):
            if imported.startswith("."):
                imported = _normalize(f"{Path(name).parent.as_posix()}/{imported}")
            pending.append(imported)
    return dict(sorted(sources.items()))


def _normalize(name: str) -> str:
    """Resolve `.` and `..` in a source unit name."""
    parts: list[str] = []
    for part in name.split("/"):
        if part == "..":
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)


def sources_digest(sources: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name, text in sorted(sources.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class Compiler:
    kind: str  # "native" or "solcjs"
    command: tuple[str, ...]

    def compile(self, sources: dict[str, str]) -> dict:
        request = {"language": "Solidity", "sources": {n: {"content": t} for n, t in sources.items()},
                   "settings": SETTINGS}
        # files, not pipes: solcjs reads stdin with one readFileSync, which fails (EAGAIN) on a pipe not yet filled,
        # and exits before a large answer is flushed to a full pipe
        with tempfile.TemporaryFile("w+") as stdin, tempfile.TemporaryFile("w+") as stdout:
            json.dump(request, stdin)
            stdin.seek(0)
            proc = subprocess.run([*self.command, "--standard-json"], stdin=stdin, stdout=stdout,
                                  stderr=subprocess.PIPE, text=True, timeout=600)
            stdout.seek(0)
            answer = stdout.read()
        output = _parse_json_output(answer)
        if output is None:
            raise CompileError(f"{self.kind} solc gave no JSON output: {(proc.stderr or answer).strip()[:300]}")
        errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
        if errors:
            raise CompileError("; ".join(e.get("formattedMessage", e["message"]).strip() for e in errors))
        return output


def _parse_json_output(stdout: str) -> dict | None:
    """solcjs may print a non-JSON line (e.g. about SMT solvers) before the JSON document."""
    start = stdout.find("{")
    while start != -1:
        try:
            return json.loads(stdout[start:])
        except json.JSONDecodeError:
            start = stdout.find("\n{", start + 1)
            start = start + 1 if start != -1 else -1
    return None


def _version_of(command: list[str]) -> str | None:
    try:
        out = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else None


def find_compiler(root: Path | None = None) -> Compiler:
    """A native solc of the pinned version if installed (py-solc-x or PATH), else the pinned npm solcjs."""
    root = root or project_root()
    candidates: list[str] = []
    try:
        import solcx

        if any(str(v) == SOLC_VERSION for v in solcx.get_installed_solc_versions()):
            candidates.append(str(solcx.get_executable(SOLC_VERSION)))
    except Exception:  # py-solc-x missing or its install folder unreadable: fall through to PATH / solcjs
        pass
    if shutil.which("solc"):
        candidates.append(shutil.which("solc"))
    for exe in candidates:
        if _version_of([exe]) == SOLC_VERSION:
            return Compiler("native", (exe,))
    solcjs = root / "node_modules" / "solc" / "solc.js"
    node = shutil.which("node")
    if solcjs.is_file() and node and _version_of([node, str(solcjs)]) == SOLC_VERSION:
        return Compiler("solcjs", (node, str(solcjs)))
    raise CompileError(f"no solc {SOLC_VERSION} found: install it natively or run `npm ci` for solcjs")


def build_artifacts(output: dict, sources: dict[str, str]) -> dict[str, dict]:
    digest = sources_digest(sources)
    artifacts = {}
    for unit in output["contracts"].values():
        for name, data in unit.items():
            if name not in CONTRACTS:
                continue
            artifacts[name] = {
                "contractName": name,
                "abi": data["abi"],
                "bytecode": "0x" + data["evm"]["bytecode"]["object"],
                "deployedBytecode": "0x" + data["evm"]["deployedBytecode"]["object"],
                "compiler": {"version": SOLC_VERSION, "settings": SETTINGS},
                "sourceDigest": digest,
                "sources": {n: hashlib.sha256(t.encode()).hexdigest() for n, t in sources.items()},
            }
    missing = set(CONTRACTS) - set(artifacts)
    if missing:
        raise CompileError(f"compiler output lacks {', '.join(sorted(missing))}")
    return artifacts


def compile_contracts(root: Path | None = None, out_dir: Path = ARTIFACTS_DIR) -> tuple[Compiler, list[Path]]:
    sources = collect_sources(root)
    compiler = find_compiler(root)
    artifacts = build_artifacts(compiler.compile(sources), sources)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, artifact in artifacts.items():
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(artifact, indent=1, sort_keys=True) + "\n")
        written.append(path)
    return compiler, written


def check(root: Path | None = None, out_dir: Path = ARTIFACTS_DIR, recompile: bool = True) -> list[str]:
    """Problems with the committed artifacts (empty when fresh). With a compiler at hand, also recompile and
    compare the bytecode."""
    sources = collect_sources(root)
    digest = sources_digest(sources)
    problems = []
    current = {}
    for name in CONTRACTS:
        path = out_dir / f"{name}.json"
        if not path.is_file():
            problems.append(f"{path}: missing; run `fedchain chain compile`")
            continue
        current[name] = json.loads(path.read_text())
        if current[name].get("sourceDigest") != digest:
            changed = sorted(n for n, t in sources.items()
                             if current[name].get("sources", {}).get(n) != hashlib.sha256(t.encode()).hexdigest())
            problems.append(f"{path.name}: stale (sources changed: {', '.join(changed) or 'set of files'}); "
                            "run `fedchain chain compile`")
    if problems or not recompile:
        return problems
    fresh = build_artifacts(find_compiler(root).compile(sources), sources)
    for name, artifact in fresh.items():
        if artifact["bytecode"] != current[name]["bytecode"] or artifact["abi"] != current[name]["abi"]:
            problems.append(f"{name}.json: bytecode or ABI differs from a fresh compile; run `fedchain chain compile`")
    return problems


def load_artifact(name: str, out_dir: Path = ARTIFACTS_DIR) -> dict:
    path = out_dir / f"{name}.json"
    if not path.is_file():
        raise CompileError(f"artifact {path} is missing; run `fedchain chain compile`")
    return json.loads(path.read_text())
