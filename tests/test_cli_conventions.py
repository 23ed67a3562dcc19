"""The console's conventions: --version, -v (tracebacks) and -q, one-line errors for the newcomer commands."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fedchain(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fednode", *args], capture_output=True, text=True, cwd=cwd,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_version_and_exit_codes_in_help():
    assert fedchain("--version").stdout.startswith("fedchain ")
    assert "exit status: 0 success" in fedchain("--help").stdout


def test_errors_are_one_line_and_verbose_shows_the_traceback(tmp_path):
    (tmp_path / "fed").mkdir()
    config = tmp_path / "fed" / "x.toml"
    config.write_text('[chain]\nrpc = "http://127.0.0.1:1"\n')
    for args, words in ((("status", "--config", str(config)), "cannot reach JSON-RPC endpoint http://127.0.0.1:1"),
                        (("generate", "--adapter", str(tmp_path), "hi"), "not an exported adapter"),
                        (("adapter", "export", "--config", str(config), "--out", str(tmp_path / "a")),
                         "http://127.0.0.1:1"),
                        (("stack", "up", "--dir", str(tmp_path / "s"), "--ipfs-nodes", "0"),
                         "--ipfs-nodes must be at least 1, got 0")):
        proc = fedchain(*args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
    assert "Traceback" in fedchain("-v", "generate", "--adapter", str(tmp_path), "hi").stderr
