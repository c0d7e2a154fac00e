"""Kubernetes manifests in: explanation and config out (pure, no API server).

No I/O: the CLI reads files and stdin. May import :mod:`v6lb.model` and
:mod:`v6lb.render`, never the engines, the lab or the CLI.

- :mod:`v6lb.k8s.manifests` (with :mod:`v6lb.k8s.yamldocs`): the typed objects, read
  from multi-document YAML or a ``List`` as kubectl prints it;
- :mod:`v6lb.k8s.aws`: what the AWS Load Balancer Controller's annotations make the AWS
  load balancer do, with :mod:`v6lb.k8s.sources` holding the public source of every rule;
- :mod:`v6lb.k8s.pitfalls`: the known traps across all the objects;
- :mod:`v6lb.k8s.derive` and :mod:`v6lb.k8s.emit`: a v6lb config with a topology.
"""
