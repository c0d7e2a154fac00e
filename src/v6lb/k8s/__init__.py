"""Kubernetes manifests in: explanation and config out (pure, no API server)."""
