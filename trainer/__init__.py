"""r1-grpo: SFT -> GRPO training of DeepSeek-R1-style reasoning models, locally and on Kubernetes."""

__version__ = "0.1.0"
