"""The local development stack: a real anvil testnet and a real IPFS node on 127.0.0.1, run as background processes
with logs and pid files in a state folder (`fedchain stack up|down|status`)."""
