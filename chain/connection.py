"""Chain backends behind one interface: the in-process eth-tester chain or any JSON-RPC URL."""
from __future__ import annotations

from web3 import Web3

EMBEDDED = "embedded"
ANVIL_CHAIN_ID = 31337


class ConnectionError_(RuntimeError):
    """The chain cannot be reached."""


def connect(rpc: str = EMBEDDED, timeout: float = 30.0) -> Web3:
    """`embedded` for a fresh in-process chain (eth-tester + py-evm), else an HTTP JSON-RPC URL."""
    if rpc == EMBEDDED:
        from eth_tester import EthereumTester, PyEVMBackend
        from web3 import EthereumTesterProvider

        return Web3(EthereumTesterProvider(EthereumTester(PyEVMBackend())))
    if not rpc.startswith(("http://", "https://")):
        raise ConnectionError_(f"rpc must be 'embedded' or an http(s) JSON-RPC URL, got {rpc!r}")
    w3 = Web3(Web3.HTTPProvider(rpc, request_kwargs={"timeout": timeout}))
    try:
        w3.eth.chain_id
    except Exception as exc:  # requests/aiohttp errors differ by version; all mean "not reachable"
        raise ConnectionError_(f"cannot reach JSON-RPC endpoint {rpc}: {type(exc).__name__}") from None
    return w3


def is_embedded(w3: Web3) -> bool:
    return hasattr(w3.provider, "ethereum_tester")


def advance_time(w3: Web3, seconds: int) -> None:
    """Move a development chain's clock forward and mine a block (eth-tester or anvil only)."""
    if is_embedded(w3):
        tester = w3.provider.ethereum_tester
        tester.time_travel(w3.eth.get_block("latest")["timestamp"] + seconds)
        tester.mine_blocks(1)
    elif w3.eth.chain_id == ANVIL_CHAIN_ID:
        w3.provider.make_request("evm_increaseTime", [seconds])
        w3.provider.make_request("evm_mine", [])
    else:
        raise ConnectionError_("advance_time works only on a development chain (embedded or anvil)")
