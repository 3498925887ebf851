"""The GRPO algorithm as a torch-only library: advantages and loss, token log-probs, the group sampler."""
