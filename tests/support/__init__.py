"""Test support, also used by bench/controller.py: an in-memory Kubernetes API server and the helm tool."""
