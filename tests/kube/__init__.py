"""The local Kubernetes the pod and Helm tests run against (see docs/kubernetes.md)."""
