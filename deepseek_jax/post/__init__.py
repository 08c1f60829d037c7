"""Post-training: GRPO with rule rewards (SPEC §8), on-policy MTP, and distillation by SFT."""
