"""Small-UDP packets per second through an LB namespace: ``--dataplane python`` vs ``kernel``.

Method (root; needs iperf3, installed from Debian: ``apt-get install iperf3``):
- Three namespaces ``v6lb-p-<pid>-<n>``: outside (client), LB, inside (backend),
  joined by veth pairs; IPv6 forwarding on in the LB.
- ``nat``: a ``nat`` VIP ``[2001:db8:f::80]:5201`` for udp (the data) and one
  for tcp (iperf3's control connection), one backend running ``iperf3 -s``;
  the client runs ``iperf3 -u -l 64 -b 0`` to the VIP.
- ``npt``: ``fd00:b::/48 <-> 2001:db8:e::/48``; the inside host runs
  ``iperf3 -u -l 64 -b 0`` (bound to its inside address) to an ``iperf3 -s`` on
  the outside host.
- ``dsr-ip6ip6``: two ``dsr-ip6ip6`` VIPs (udp and tcp) on ``[2001:db8:f::80]:5201``
  whose one backend decapsulates ``fd00:60:1::10`` (``v6lb backend``) and runs
  ``iperf3 -s`` on the VIP; it answers from the VIP over a direct link to the
  client (a source rule), so the replies skip the LB.
- Data planes: ``kernel`` and, for each ``--io`` mode, ``python-<io>``: the python
  data plane with ``V6LB_PYTHON_IO=<io>`` (``ring``: AF_PACKET rings; ``tun``: TUN).
- Each run starts ``v6lb run FILE --dataplane D --netns LB``, sends small UDP
  for SECONDS and reads the receiver's count from the client's ``--json``
  (``packets - lost_packets``): received packets per second, 64-byte UDP
  payloads (112-byte IPv6 packets); then one TCP stream (iperf3 defaults) for
  SECONDS: the receiver's bit/s. Then it stops the LB (SIGTERM).
- Runs are interleaved: for each of RUNS rounds, every (mode, data plane) once.
  We report the median and min-max of each figure and the ratio of the
  medians (python / kernel), and the 1-minute load average when each run started
  (each line, and the median per row): figures taken at a load above 0.5 are not
  those of a quiet machine.
Run: ``sudo .venv/bin/python benchmarks/bench_tun.py [--runs 5] [--seconds 3] [--io ring,tun]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

V6LB = str(Path(sys.executable).parent / "v6lb")
VIP = "2001:db8:f::80"
BACKEND = "2001:db8:b::10"
INSIDE, OUTSIDE = "fd00:b::/48", "2001:db8:e::/48"
INSIDE_HOST = "fd00:b::10"
DECAP = "fd00:60:1::10"
OUTSIDE_HOST = "2001:db8:a::2"
_counter = itertools.count()


def sh(*argv: str, stdin: str | None = None) -> str:
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr}")
    return r.stdout


def nsx(ns: str, *argv: str, stdin: str | None = None) -> str:
    return sh("ip", "netns", "exec", ns, *argv, stdin=stdin)


@contextmanager
def namespaces(*roles: str, tag: str = "p") -> Iterator[dict[str, str]]:
    """One namespace per role, ``v6lb-<tag>-<pid>-<n>``, deleted on exit whatever happens."""
    names = {role: f"v6lb-{tag}-{os.getpid()}-{next(_counter)}" for role in roles}
    made: list[str] = []
    try:
        for ns in names.values():
            sh("ip", "netns", "add", ns)
            made.append(ns)
            nsx(ns, "ip", "link", "set", "lo", "up")
        yield names
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def config(mode: str, sock: str) -> dict[str, Any]:
    lb: dict[str, Any] = {
        "instance": f"b{os.getpid() % 100000}",
        "flow_hash_seed": 0x5EED,
        "interfaces": ["l0", "l1"],
        "addresses": ["2001:db8:a::1", "2001:db8:b::1"],
        "control_socket": sock,
    }
    if mode == "npt":
        return {"lb": lb, "npt": [{"inside": INSIDE, "outside": OUTSIDE}]}
    vip: dict[str, Any] = {
        "address": VIP,
        "ports": [5201],
        "mode": mode,
        "health": {"type": "none"},
        "backends": [{"address": DECAP if mode == "dsr-ip6ip6" else BACKEND}],
    }
    if mode == "dsr-ip6ip6":
        vip["tunnel_source"] = "2001:db8:b::1"
    return {
        "lb": lb,
        "vips": [
            {"name": "data", "protocol": "udp", **vip},
            {"name": "ctl", "protocol": "tcp", **vip},
        ],
    }


def setup(ns: dict[str, str], tmp: Path) -> None:
    c, lb, b = ns["client"], ns["lb"], ns["backend"]
    for a, a_if, z, z_if in ((c, "c0", lb, "l0"), (lb, "l1", b, "b0"), (c, "cb", b, "r0")):
        sh("ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", z_if, "netns", z)
        nsx(a, "ip", "link", "set", a_if, "up")
        nsx(z, "ip", "link", "set", z_if, "up")
    nsx(lb, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    lines = {
        c: [
            f"address add {OUTSIDE_HOST}/64 dev c0 nodad",
            "route add default via 2001:db8:a::1",
            "address add 2001:db8:d::1/64 dev cb nodad",
        ],
        lb: [
            "address add 2001:db8:a::1/64 dev l0 nodad",
            "address add 2001:db8:b::1/64 dev l1 nodad",
            "address add fd00:b::1/64 dev l1 nodad",
            f"route add {DECAP}/64 via {BACKEND}",
        ],
        b: [
            f"address add {BACKEND}/64 dev b0 nodad",
            f"address add {INSIDE_HOST}/64 dev b0 nodad",
            "route add default via 2001:db8:b::1",
            # dsr: the backend answers from the VIP straight to the client
            "address add 2001:db8:d::2/64 dev r0 nodad",
            "route add default via 2001:db8:d::1 table 100 advmss 1400",  # the tunnel: 40 bytes
            f"rule add from {VIP} lookup 100 pref 100",
        ],
    }
    for n, ls in lines.items():
        nsx(n, "ip", "-6", "-batch", "-", stdin="\n".join(ls) + "\n")
    # dsr-ip6ip6: the backend decapsulates DECAP and holds the VIP on lo (v6lb backend)
    be = tmp / "backend.yaml"
    data = config("dsr-ip6ip6", str(tmp / "be.sock"))
    data["lb"]["instance"] = f"e{os.getpid() % 100000}"
    be.write_text(yaml.safe_dump(data))
    sh(V6LB, "backend", str(be), "--address", DECAP, "--dev", "b0", "--netns", b)


def iperf(client_ns: str, target: str, bind: list[str], udp: bool, seconds: float) -> float:
    """One iperf3 client run: received packets/s (UDP) or received bit/s (TCP)."""
    extra = ["-u", "-l", "64", "-b", "0"] if udp else []
    for attempt in range(3):
        try:
            r = subprocess.run(
                ["ip", "netns", "exec", client_ns, "iperf3", "-c", target, *bind, *extra,
                 "-t", str(seconds), "--json"],
                capture_output=True, text=True, timeout=seconds + 30,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            # iperf3's control connection shares the flooded path and can stall
            # at the end of a test: run it again.
            continue
        doc = json.loads(r.stdout or "{}")
        end = doc.get("end", {})
        if udp and "sum" in end:
            return (int(end["sum"]["packets"]) - int(end["sum"]["lost_packets"])) / float(
                end["sum"]["seconds"]
            )
        if not udp and "sum_received" in end:
            return float(end["sum_received"]["bits_per_second"])
        if attempt == 2 or "unable to connect" not in str(doc.get("error", "")):
            raise RuntimeError(f"iperf3 gave no result: {doc.get('error', r.stdout[-500:])}")
        time.sleep(1.0)  # the LB's rules are still going in: try again
    raise RuntimeError(f"iperf3 to {target} did not finish in 3 tries")


def one_run(
    ns: dict[str, str], mode: str, dataplane: str, seconds: float, tmp: Path
) -> tuple[float, float]:
    """One (mode, data plane) run: (small-UDP received pps, TCP received bit/s).

    ``dataplane``: ``kernel``, or ``python-<io>`` (``V6LB_PYTHON_IO=<io>``).
    """
    sock = str(tmp / f"{mode}-{dataplane}.sock")
    path = tmp / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config(mode, sock)))
    server_ns, client_ns = (
        (ns["client"], ns["backend"]) if mode == "npt" else (ns["backend"], ns["client"])
    )
    server_addr = {"nat": BACKEND, "npt": OUTSIDE_HOST}.get(mode, VIP)
    target, bind = (OUTSIDE_HOST, ["-B", INSIDE_HOST]) if mode == "npt" else (VIP, [])
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-B", server_addr],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = dict(os.environ)
    plane, _, io = dataplane.partition("-")
    if io:
        env["V6LB_PYTHON_IO"] = io
    run = subprocess.Popen(
        [V6LB, "run", str(path), "--dataplane", plane, "--netns", ns["lb"]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if run.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"v6lb run did not start: {run.stderr.read() if run.stderr else ''}"
                )
            time.sleep(0.05)
        time.sleep(0.3)
        if run.poll() is not None:
            raise RuntimeError(f"v6lb run stopped: {run.stderr.read() if run.stderr else ''}")
        pps = iperf(client_ns, target, bind, True, seconds)
        bps = iperf(client_ns, target, bind, False, seconds)
        return pps, bps
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=30)
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--modes", default="nat,npt,dsr-ip6ip6")
    ap.add_argument(
        "--io", default="ring,tun", help="the python data plane's I/O modes to run (V6LB_PYTHON_IO)"
    )
    ap.add_argument("--json", metavar="FILE", help="also write the raw figures here")
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("iperf3") is None:
        print("needs root and iperf3 (apt-get install iperf3)", file=sys.stderr)
        return 2
    modes = args.modes.split(",")
    planes = [f"python-{io}" for io in args.io.split(",") if io] + ["kernel"]
    results: dict[str, dict[str, dict[str, list[float]]]] = {
        m: {dp: {"pps": [], "bps": [], "load": []} for dp in planes} for m in modes
    }
    with tempfile.TemporaryDirectory() as tmp, namespaces("client", "lb", "backend") as ns:
        setup(ns, Path(tmp))
        for i in range(args.runs):
            for mode in modes:
                order = planes if i % 2 == 0 else planes[::-1]
                for dp in order:
                    load = os.getloadavg()[0]
                    pps, bps = one_run(ns, mode, dp, args.seconds, Path(tmp))
                    results[mode][dp]["pps"].append(pps)
                    results[mode][dp]["bps"].append(bps)
                    results[mode][dp]["load"].append(load)
                    print(
                        f"run {i + 1} {mode:10} {dp:11} {pps / 1000:8.1f} kpps"
                        f" {bps / 1e9:6.2f} Gbit/s  load {load:.2f}",
                        flush=True,
                    )
    print(
        f"\n{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs,"
    )
    print(
        f"{args.runs} interleaved runs of {args.seconds:g} s, iperf3 UDP 64-byte payloads"
        " and one TCP stream\n"
    )
    print(
        "| mode | metric | python I/O | python median (min-max) | kernel median (min-max)"
        " | python/kernel | load (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        for metric, scale, unit in (("pps", 1e3, "kpps"), ("bps", 1e9, "Gbit/s")):
            k = results[mode]["kernel"][metric]
            mk = statistics.median(k)
            for dp in planes[:-1]:
                p = results[mode][dp][metric]
                mp = statistics.median(p)
                load = statistics.median(
                    results[mode][dp]["load"] + results[mode]["kernel"]["load"]
                )
                print(
                    f"| {mode} | {unit} | {dp.partition('-')[2]}"
                    f" | {mp / scale:.2f} ({min(p) / scale:.2f}-{max(p) / scale:.2f})"
                    f" | {mk / scale:.2f} ({min(k) / scale:.2f}-{max(k) / scale:.2f})"
                    f" | {mp / mk:.2f}x | {load:.2f} |"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
