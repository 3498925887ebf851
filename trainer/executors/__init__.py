"""Executors of one stage list: the local pipeline and the Kubernetes controller (neither imports torch)."""
