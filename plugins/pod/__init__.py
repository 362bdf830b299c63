"""The pod runtime: each sandbox a Kubernetes pod (or an agent-sandbox `Sandbox`) running the guest
agent, reached through the API server's exec/attach streams (README: Runtimes, docs/kubernetes.md)."""
