"""The operator side: the `fedchain` command, TOML configs, the participant built from one, the long-running node
and aggregator services, the demo and the in-process federation it runs."""
