"""The Kubernetes controller: runs a release's stage PyTorchJobs in order from inside the cluster."""
