"""Keystore passwords: a file, the keystore's own variable, the shared one, a prompt only in the foreground."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fednode.ops import passwords
from fednode.ops.passwords import PasswordError, env_name, password_for

ROOT = Path(__file__).resolve().parent.parent


def test_sources_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDCHAIN_PASSWORD", raising=False)
    assert env_name("keys/hospital-0.json") == "FEDCHAIN_PASSWORD_HOSPITAL_0"
    monkeypatch.setenv("FEDCHAIN_PASSWORD", "shared")
    assert password_for("keys/hospital-0.json") == "shared"
    monkeypatch.setenv("FEDCHAIN_PASSWORD_HOSPITAL_0", "own")
    assert password_for("keys/hospital-0.json") == "own"
    assert password_for("keys/admin.json") == "shared"
    (tmp_path / "pw").write_text("from file\nignored\n")
    assert password_for("keys/hospital-0.json", tmp_path / "pw") == "from file"
    with pytest.raises(PasswordError, match="not found"):
        password_for("keys/hospital-0.json", tmp_path / "missing")
    (tmp_path / "empty").write_text("")
    with pytest.raises(PasswordError, match="empty"):
        password_for("keys/hospital-0.json", tmp_path / "empty")


def test_prompt_only_in_the_foreground_and_confirmed(monkeypatch):
    for name in ("FEDCHAIN_PASSWORD", "FEDCHAIN_PASSWORD_ADMIN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(passwords, "can_prompt", lambda: False)
    with pytest.raises(PasswordError, match="no terminal to ask on .* FEDCHAIN_PASSWORD_ADMIN"):
        password_for("keys/admin.json")
    answers = iter(["one", "two"])
    monkeypatch.setattr(passwords, "can_prompt", lambda: True)
    monkeypatch.setattr(passwords.getpass, "getpass", lambda prompt: next(answers))
    with pytest.raises(PasswordError, match="differ"):
        password_for("keys/admin.json", confirm=True)


def test_wallet_new_without_a_terminal_and_a_wrong_password_are_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def fedchain(*args, **extra):
        return subprocess.run([sys.executable, "-m", "fednode", *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, env={**env, **extra}, cwd=tmp_path, timeout=120)

    proc = fedchain("wallet", "new", "--out", "keys/admin.json")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "FEDCHAIN_PASSWORD_ADMIN" in proc.stderr
    assert fedchain("wallet", "new", "--out", "keys/admin.json", FEDCHAIN_PASSWORD_ADMIN="right").returncode == 0
    proc = fedchain("chain", "deploy", "--rpc", "embedded", "--keystore", "keys/admin.json",
                    FEDCHAIN_PASSWORD="wrong")
    assert proc.returncode == 2 and proc.stderr.strip().endswith("fedchain: error: wrong password for keys/admin.json")
