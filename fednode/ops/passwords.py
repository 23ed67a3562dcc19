"""Keystore passwords, per keystore, first found wins: the config's `[wallet] password_file`, the environment
variable named for the keystore (`keys/hospital-0.json` -> `FEDCHAIN_PASSWORD_HOSPITAL_0`), `FEDCHAIN_PASSWORD`
(one for every keystore), and only then a prompt, when this process is in the terminal's foreground. In the
background or without a terminal there is no prompt (it would stop the job): a one-line error says what to set."""
from __future__ import annotations

import getpass
import os
import re
import sys
from pathlib import Path

SHARED_ENV = "FEDCHAIN_PASSWORD"


class PasswordError(ValueError):
    """No password can be had for a keystore, or the one given is unusable."""


def env_name(keystore: Path | str) -> str:
    """The environment variable holding this keystore's own password."""
    return f"{SHARED_ENV}_{re.sub(r'[^A-Z0-9]', '_', Path(keystore).stem.upper())}"


def can_prompt() -> bool:
    """Whether a prompt can be answered: stdin is a terminal and this process is its foreground job."""
    try:
        return sys.stdin.isatty() and os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):
        return False


def read_password_file(path: Path) -> str:
    """The first line of a password file (kept out of the config itself)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise PasswordError(f"password file {path} not found") from None
    if not lines or not lines[0]:
        raise PasswordError(f"password file {path} is empty (the password is its first line)")
    return lines[0]


def password_for(keystore: Path | str, password_file: Path | None = None, confirm: bool = False) -> str:
    """The password of `keystore` (see the module docstring); `confirm` asks twice when it prompts."""
    if password_file is not None:
        return read_password_file(password_file)
    for name in (env_name(keystore), SHARED_ENV):
        if os.environ.get(name):
            return os.environ[name]
    if not can_prompt():
        raise PasswordError(f"no password for {keystore} and no terminal to ask on (in the background?): set "
                            f"{env_name(keystore)} or {SHARED_ENV}, or give a password file ([wallet] password_file, "
                            "--password-file)")
    password = getpass.getpass(f"password for {keystore}: ")
    if confirm and getpass.getpass(f"repeat the password for {keystore}: ") != password:
        raise PasswordError(f"the two passwords differ; {keystore} not written")
    return password
