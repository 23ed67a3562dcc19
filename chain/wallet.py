"""Signing accounts: encrypted geth keystore v3 files, or the well-known keys of a local development chain."""
from __future__ import annotations

import json
import os
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from .connection import ANVIL_CHAIN_ID, is_embedded

ANVIL_MNEMONIC = "test test test test test test test test test test test junk"


class WalletError(ValueError):
    """A keystore cannot be read, written or decrypted."""


def new_keystore(path: Path, password: str, private_key: bytes | None = None) -> LocalAccount:
    """Write a geth-style v3 keystore (scrypt) for a new (or the given) key; never overwrites a file."""
    if not password:
        raise WalletError("refusing an empty keystore password")
    path = Path(path)
    if path.exists():
        raise WalletError(f"{path} already exists; not overwriting a keystore")
    account = Account.from_key(private_key) if private_key else Account.create()
    data = Account.encrypt(account.key, password)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)
    return account


def load_keystore(path: Path, password: str) -> LocalAccount:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WalletError(f"keystore {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WalletError(f"keystore {path} is not a JSON keystore file") from None
    try:
        return Account.from_key(Account.decrypt(data, password))
    except ValueError as exc:
        if "MAC mismatch" in str(exc):
            raise WalletError(f"wrong password for {path}") from None
        raise WalletError(f"cannot decrypt keystore {path}: {exc}") from None
    except (KeyError, TypeError):
        raise WalletError(f"keystore {path} is not a v3 keystore") from None


def dev_account(w3: Web3, index: int) -> LocalAccount:
    """Funded account number `index` of the embedded chain or of anvil (its default mnemonic)."""
    if index < 0 or index > 9:
        raise WalletError(f"dev account index must be 0..9, got {index}")
    if is_embedded(w3):
        return Account.from_key((index + 1).to_bytes(32, "big"))
    if w3.eth.chain_id == ANVIL_CHAIN_ID:
        Account.enable_unaudited_hdwallet_features()
        return Account.from_mnemonic(ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}")
    raise WalletError("dev accounts exist only on a local chain (embedded or anvil, chain id 31337); use a keystore")


def fund(w3: Web3, funder: LocalAccount, to: str, wei: int) -> None:
    """Send ether from a dev account to a new wallet (local chains only)."""
    from .transactions import TxSender

    TxSender(w3, funder).send_value(Web3.to_checksum_address(to), wei)
