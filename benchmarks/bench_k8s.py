"""`v6lb k8s config` on a large cluster: 5,000 Services and 50,000 endpoints in one file.

Method: the file is generated as ``kubectl get svc,endpointslices -A -o yaml`` prints a
cluster (one ``kind: List``): 5,000 IPv6 LoadBalancer Services (NLB, ip targets, one port
with a named targetPort), each with one EndpointSlice of 10 endpoints (ready, the last
of every tenth slice terminating), over 100 nodes whose pods share a /80 each, as EKS
gives them. The command runs end to end as a user runs it (``python -m v6lb.cli k8s
config FILE -o OUT``: start-up, read, parse, derive, write), 3 times; the figure is the
median wall time. The load average (/proc/loadavg, 1 min) is printed before and after.

Run: ``.venv/bin/python benchmarks/bench_k8s.py`` (the venv of ``make test``).
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVICES = 5_000
PER_SERVICE = 10
NODES = 100


def generate(path: Path, services: int = SERVICES, per: int = PER_SERVICE) -> None:
    """Write the cluster as one kubectl ``List``."""
    out = ["apiVersion: v1", "kind: List", "metadata:", '  resourceVersion: ""', "items:"]
    add = out.append
    for s in range(services):
        ns, name = f"team{s % 50}", f"svc{s}"
        add(f"""- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      service.beta.kubernetes.io/aws-load-balancer-ip-address-type: dualstack
      service.beta.kubernetes.io/aws-load-balancer-nlb-target-type: ip
      service.beta.kubernetes.io/aws-load-balancer-scheme: internet-facing
      service.beta.kubernetes.io/aws-load-balancer-type: external
    creationTimestamp: "2026-11-02T09:14:07Z"
    name: {name}
    namespace: {ns}
    resourceVersion: "{100000 + s}"
    uid: 5f0e6c2a-0000-4000-8000-{s:012d}
  spec:
    allocateLoadBalancerNodePorts: true
    clusterIP: fd00:ab::{s:x}
    clusterIPs:
    - fd00:ab::{s:x}
    externalTrafficPolicy: Cluster
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv6
    ipFamilyPolicy: SingleStack
    ports:
    - name: http
      nodePort: {30000 + s % 2700}
      port: 80
      protocol: TCP
      targetPort: http
    selector:
      app: {name}
    sessionAffinity: None
    type: LoadBalancer
  status:
    loadBalancer:
      ingress:
      - hostname: k8s-{ns}-{name}-0123456789.elb.us-west-2.amazonaws.com""")
        eps = []
        for e in range(per):
            k = s * per + e
            node = k % NODES
            term = e == per - 1 and s % 10 == 0
            cond = (
                "ready: false\n        serving: true\n        terminating: true"
                if term
                else "ready: true\n        serving: true\n        terminating: false"
            )
            eps.append(f"""    - addresses:
      - 2600:1f14:abc:de{node // 256:02x}:{node % 256:x}00:{k // 65536:x}:{k % 65536:x}:1
      conditions:
        {cond}
      nodeName: ip-10-0-{node}-1.us-west-2.compute.internal
      targetRef:
        kind: Pod
        name: {name}-7c9f8d6b5-{k:05d}
        namespace: {ns}
        uid: 9a1b2c3d-0000-4000-8000-{k:012d}
      zone: us-west-2{"abc"[node % 3]}""")
        add(f"""- addressType: IPv6
  apiVersion: discovery.k8s.io/v1
  endpoints:
{chr(10).join(eps)}
  kind: EndpointSlice
  metadata:
    generateName: {name}-
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: {name}
    name: {name}-x{s:05d}
    namespace: {ns}
    resourceVersion: "{200000 + s}"
    uid: 7e3d1f00-0000-4000-8000-{s:012d}
  ports:
  - name: http
    port: 8080
    protocol: TCP""")
    path.write_text("\n".join(out) + "\n")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "cluster.yaml", Path(tmp) / "v6lb.yaml"
        generate(src)
        size = src.stat().st_size
        print(f"{platform.processor() or platform.machine()}, {platform.python_version()}")
        print(f"file: {SERVICES} Services, {SERVICES * PER_SERVICE} endpoints, {size} bytes")
        print(f"load average before: {loadavg()}")
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = subprocess.run(
                [sys.executable, "-m", "v6lb.cli", "k8s", "config", str(src), "-o", str(dst)],
                capture_output=True,
                text=True,
            )
            times.append(time.perf_counter() - t0)
            if r.returncode != 0:
                sys.exit(f"k8s config failed ({r.returncode}): {r.stderr[-2000:]}")
        print(f"load average after: {loadavg()}")
        print(f"k8s config: median {statistics.median(times):.2f} s, min {min(times):.2f} s")
        print(f"output: {dst.stat().st_size} bytes, {len(r.stderr.splitlines())} stderr lines")


if __name__ == "__main__":
    main()
