"""Aggregation rules, one object per rule and one module per rule family (`fedavg`, `fedopt`, `lora_exact`),
registered by name in `registry`. `base` (the Strategy protocol, errors, records) imports without torch."""
