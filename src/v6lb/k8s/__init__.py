"""Kubernetes manifests in: what the AWS load balancer does with them, and a v6lb config.

Pure: no I/O. May import :mod:`v6lb.model` and :mod:`v6lb.render`, never the engines,
the lab or the CLI. :mod:`v6lb.k8s.aws` reads the AWS Load Balancer Controller's
annotations, :mod:`v6lb.k8s.pitfalls` finds the known traps across all the objects, and
:mod:`v6lb.k8s.sources` holds the public source of every rule (docs/kubernetes.md).
"""
