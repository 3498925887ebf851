"""Executors of one stage list: the local pipeline and the Kubernetes controller (no torch at import time)."""
