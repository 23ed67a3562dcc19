"""fedchain's hospital side: data, LoRA training, adapter packaging, storage, node, aggregator, audit, CLI."""
