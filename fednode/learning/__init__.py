"""What happens inside one hospital: its data and partition, the base model, local adapter training and
evaluation, LoRA algebra and differential privacy. Knows nothing of chains or storage."""
