"""The Kubernetes executor: the in-cluster controller that runs a release's stage jobs; `r1-grpo status`."""
