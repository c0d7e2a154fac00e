"""End to end over veth: the xdp data plane against the kernel (nft) data plane.

Method (root; the object from ``make xdp``):
- Two namespaces ``v6lb-xv-<pid>-<n>``: ``gen`` (the client side and the router)
  and ``lb``, joined by one veth pair ``g0``-``l0``. The LB is one-armed: its
  tunnel ends (``2001:db8:b::1`` .. ``::4``) are routed back through ``gen``,
  whose MAC is a static neighbour, so both planes send every encapsulated packet
  back over the same veth to ``gen``.
- The generator is BPF_PROG_TEST_RUN in live-frames mode (what xdp-trafficgen
  uses inside; Debian's xdp-trafficgen does not start on this kernel): a
  small XDP program returning XDP_TX, run ``--count`` times in ``gen`` on one
  78-byte UDP frame to the VIP (a 16-byte payload), with ``g0`` as its ingress
  device: each run transmits the frame to ``l0``. The program first writes back the
  frame's Ethernet and IPv6 headers, which the page it reuses may carry changed
  (``_generator``). One flow: neither
  plane keeps a per-flow cache, so every packet pays the hash and the Maglev
  lookup whatever the flow.
- The sink: a two-instruction XDP program returning XDP_DROP on ``g0`` (a veth
  needs an XDP program, or GRO, to take XDP frames at all). What the LB sent
  back is ``g0``'s ``rx_xdp_drop`` count (``ethtool -S``), so the cost of
  receiving is the same XDP_DROP for both planes.
- Planes: ``v6lb run FILE --dataplane xdp|kernel --netns LB``, the same file per
  mode: one UDP VIP (dsr-ip6ip6, dsr-srv6: 4 tunnel ends; dsr-l2: 4 backends on the
  LB's link, MACs given), health off; or one npt pair (the frame goes to an
  outside-mapped address, translated inbound, its inside prefix routed back through
  ``gen``). The kernel plane's ``l0`` has GRO on (else a veth refuses XDP frames
  without a program).
- Per (mode, plane) and round: the generator runs ``--count`` frames pinned to
  CPU ``--cpu``; everything it starts (the veth NAPI of ``l0``, the LB's work,
  the sink) runs in softirq on the same CPU. We read, around the run, the
  delivered count, the wall time and that CPU's ``softirq`` and ``system``
  ticks from /proc/stat. Figures: delivered packets per second, and CPU per
  delivered packet = (softirq + system ticks) / packets. The generator's own
  share (the reflector: ``l0`` runs the same XDP_TX program instead of a plane)
  is measured too and subtracted: the LB's CPU per packet.
- Rounds are interleaved (each round runs every case, the order rotating), the
  1-minute load average is printed beside each round; medians are reported.

Run: ``sudo .venv/bin/python benchmarks/bench_xdp_veth.py [--rounds 5] [--count 4000000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from v6lb.engines.xdp.bpf import obj_pin, prog_load_xdp
from v6lb.engines.xdp.program import OBJECT
from v6lb.wire import build

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tun import namespaces as _namespaces  # noqa: E402
from bench_tun import nsx, sh  # noqa: E402

V6LB = str(Path(sys.executable).with_name("v6lb"))
VIP = "2001:db8:f::80"
CLIENT = "2001:db8:c::7"
GEN_ADDR, LB_ADDR = "2001:db8:a::2", "2001:db8:a::1"
MODES = ("dsr-ip6ip6", "dsr-srv6", "dsr-l2", "npt")
INSIDE, OUTSIDE = "fd00:b::/64", "2001:db8:e::/64"
NPT_TARGET = "2001:db8:e::10"  # an outside-mapped address: translated to fd00:b::... inbound
L2_MAC = "02:00:00:00:0b:0{}"
PLANES = ("xdp", "kernel")
PORT = 5201
XDP_DROP, XDP_TX = 1, 3


def _insn(op: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", op, dst | src << 4, off, imm)


def _ret(verdict: int) -> bytes:
    """r0 = verdict; exit."""
    return _insn(0xB7, 0, imm=verdict) + _insn(0x95)


def _generator(frame: bytes) -> bytes:
    """XDP_TX, after writing back the frame's Ethernet and IPv6 headers (54 bytes).

    Live-frames mode hands out page-pool pages initialised with the frame once, not
    on each use, and a veth passes its pages on without a copy: a plane that
    encapsulates writes its outer header over the headroom and the first 14 bytes
    (the Ethernet header), forwarding decrements the hop limit, and npt rewrites the
    destination, all in the very page the generator sends again. So the program
    restores the headers before each transmit.
    """
    head = frame[:54]
    stores = [
        _insn(0x62, 2, off=i, imm=int.from_bytes(head[i : i + 4], "little", signed=True))
        for i in range(0, 52, 4)  # *(u32 *)(r2 + i) = ...
    ]
    stores.append(_insn(0x6A, 2, off=52, imm=int.from_bytes(head[52:54], "little")))  # u16
    return b"".join(
        (
            _insn(0x61, 2, 1, 0),  # r2 = ctx->data
            _insn(0x61, 3, 1, 4),  # r3 = ctx->data_end
            _insn(0xBF, 4, 2),  # r4 = r2
            _insn(0x07, 4, imm=54),  # r4 += 54
            _insn(0x2D, 4, 3, off=len(stores)),  # if r4 > r3 goto out (XDP_TX as it is)
            *stores,
            _ret(XDP_TX),  # out
        )
    )


_XDP_TX = _ret(XDP_TX)
_XDP_DROP = _ret(XDP_DROP)


def load() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return f.read().split()[0]


@contextmanager
def namespaces() -> Iterator[dict[str, str]]:
    """``gen`` and ``lb``, joined by g0-l0, deleted on exit whatever happens."""
    with _namespaces("gen", "lb", tag="xv") as names:
        gen, lb = names["gen"], names["lb"]
        sh("ip", "link", "add", "g0", "netns", gen, "type", "veth", "peer", "name", "l0",
           "netns", lb)  # fmt: skip
        for ns, dev in ((gen, "g0"), (lb, "l0")):
            nsx(ns, "ip", "link", "set", dev, "up")
        nsx(gen, "ip", "-6", "address", "add", f"{GEN_ADDR}/64", "dev", "g0", "nodad")
        nsx(lb, "ip", "-6", "address", "add", f"{LB_ADDR}/64", "dev", "l0", "nodad")
        nsx(lb, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        gmac = mac(gen, "g0")
        nsx(lb, "ip", "-6", "neigh", "replace", GEN_ADDR, "lladdr", gmac, "dev", "l0",
            "nud", "permanent")  # fmt: skip
        nsx(lb, "ip", "-6", "route", "add", "2001:db8:b::/64", "via", GEN_ADDR, "dev", "l0")
        nsx(lb, "ip", "-6", "route", "add", "fd00:5::/64", "via", GEN_ADDR, "dev", "l0")
        nsx(lb, "ip", "-6", "route", "add", INSIDE, "via", GEN_ADDR, "dev", "l0")
        yield names


def mac(ns: str, dev: str) -> str:
    return str(json.loads(nsx(ns, "ip", "-j", "link", "show", dev))[0]["address"])


def config(mode: str, sock: str) -> dict[str, object]:
    lb = {
        "instance": f"xv{os.getpid() % 100000}",
        "flow_hash_seed": 0x5EED,
        "interfaces": ["l0"],
        "addresses": [LB_ADDR],
        "control_socket": sock,
    }
    if mode == "npt":
        return {"lb": lb, "npt": [{"inside": INSIDE, "outside": OUTSIDE}]}
    backends: list[dict[str, str]] = [{"address": f"2001:db8:b::{i}"} for i in range(1, 5)]
    extra: dict[str, object] = {"tunnel_source": LB_ADDR, "mtu": 1500}
    if mode == "dsr-srv6":
        for i, b in enumerate(backends, 1):
            b["sid"] = f"fd00:5::{i}"
    elif mode == "dsr-l2":  # on the LB's link, MACs given: nothing to resolve
        backends = [
            {"address": f"2001:db8:a::{0x10 + i}", "mac": L2_MAC.format(i)} for i in range(1, 5)
        ]
        extra = {}
    return {
        "lb": lb,
        "vips": [
            {
                "name": "bench",
                "address": VIP,
                "ports": [PORT],
                "protocol": "udp",
                "mode": mode,
                "health": {"type": "none"},
                "backends": backends,
                **extra,
            }
        ],
    }


def frame(gmac: str, lmac: str, mode: str) -> bytes:
    pkt = build.udp(CLIENT, NPT_TARGET if mode == "npt" else VIP, 40000, PORT, payload=b"x" * 16)
    return bytes.fromhex(lmac.replace(":", "") + gmac.replace(":", "")) + b"\x86\xdd" + pkt


def xdp_attach(ns: str, dev: str, insns: bytes | None) -> None:
    """Attach a raw reflector/sink program (``insns``) to ``dev``, or detach (None)."""
    if insns is None:
        nsx(ns, "ip", "link", "set", "dev", dev, "xdp", "off")
        return
    pin = f"/sys/fs/bpf/v6lb-xv-{os.getpid()}-{dev}"
    fd = prog_load_xdp(insns, "v6lb_bench")
    try:
        obj_pin(fd, pin)
        # nsenter, not `ip -n`: that remounts /sys, hiding the bpffs the pin is on
        sh("nsenter", f"--net=/run/netns/{ns}", "ip", "link", "set", "dev", dev, "xdpdrv",
           "pinned", pin)  # fmt: skip
    finally:
        os.close(fd)
        if os.path.exists(pin):
            os.unlink(pin)


def xdp_drops(ns: str, dev: str) -> int:
    text = nsx(ns, "ethtool", "-S", dev)
    return sum(
        int(line.split(":")[1])
        for line in text.splitlines()
        if line.strip().startswith("rx_queue_") and line.strip().split(":")[0].endswith("xdp_drops")
    )


def cpu_ticks(cpu: int) -> tuple[int, int]:
    """(system, softirq) ticks of ``cpu`` from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = line.split()
                return int(v[3]), int(v[7])
    raise RuntimeError(f"/proc/stat: no cpu{cpu}")


def generate(ns: str, data: bytes, count: int, cpu: int) -> None:
    code = (
        "import sys;from v6lb.engines.xdp.bpf import prog_load_xdp,prog_test_run_live;"
        "import socket;"
        f"fd=prog_load_xdp(bytes.fromhex('{_generator(data).hex()}'),'v6lb_gen');"
        f"d=bytes.fromhex('{data.hex()}');left={count}\n"
        "while left>0:\n"
        " n=min(left,1<<20);prog_test_run_live(fd,d,n,socket.if_nametoindex('g0'));left-=n\n"
    )
    subprocess.run(["ip", "netns", "exec", ns, "taskset", "-c", str(cpu), sys.executable, "-c",
                    code], check=True)  # fmt: skip


def measure(ns: dict[str, str], data: bytes, count: int, cpu: int) -> dict[str, float]:
    before = xdp_drops(ns["gen"], "g0")
    s0, q0 = cpu_ticks(cpu)
    t0 = time.monotonic()
    generate(ns["gen"], data, count, cpu)
    wall = time.monotonic() - t0
    s1, q1 = cpu_ticks(cpu)
    got = xdp_drops(ns["gen"], "g0") - before
    hz = os.sysconf("SC_CLK_TCK")
    cpu_s = ((s1 - s0) + (q1 - q0)) / hz
    return {
        "delivered": got,
        "pps": got / wall,
        "ns_per_pkt": cpu_s / max(got, 1) * 1e9,
        "softirq_ns": (q1 - q0) / hz / max(got, 1) * 1e9,
        "load": float(load()),
    }


@contextmanager
def plane(ns: dict[str, str], mode: str, name: str, tmp: Path) -> Iterator[None]:
    if name == "reflector":
        xdp_attach(ns["lb"], "l0", _XDP_TX)
        try:
            yield
        finally:
            xdp_attach(ns["lb"], "l0", None)
        return
    sock = str(tmp / f"{name}.sock")
    path = tmp / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config(mode, sock)))
    if name == "kernel":
        nsx(ns["lb"], "ethtool", "-K", "l0", "gro", "on")
    run = subprocess.Popen(
        [V6LB, "run", str(path), "--dataplane", name, "--netns", ns["lb"]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([V6LB, "status", "--control-socket", sock, "--json"],
                             capture_output=True).returncode:  # fmt: skip
            if run.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"v6lb run --dataplane {name}: {run.stderr and run.stderr.read()}"
                )
            time.sleep(0.1)
        yield
    finally:
        run.terminate()
        run.wait(30)
        nsx(ns["lb"], "ethtool", "-K", "l0", "gro", "off")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count", type=int, default=4_000_000)
    ap.add_argument("--cpu", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--planes", default=",".join(PLANES))
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_xdp_veth: needs root (namespaces, bpf(2)): skipped")
        return 0
    if not OBJECT.is_file():
        print(f"bench_xdp_veth: {OBJECT} is missing: run `make xdp`: skipped")
        return 0
    cases = [("-", "reflector")] + [(m, p) for m in a.modes.split(",") for p in a.planes.split(",")]
    results: dict[tuple[str, str], list[dict[str, float]]] = {c: [] for c in cases}
    with namespaces() as ns, tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        gmac, lmac = mac(ns["gen"], "g0"), mac(ns["lb"], "l0")
        xdp_attach(ns["gen"], "g0", _XDP_DROP)
        for r in range(a.rounds):
            order = cases[r % len(cases) :] + cases[: r % len(cases)]
            for mode, name in order:
                with plane(ns, mode, name, tmp):
                    m = measure(ns, frame(gmac, lmac, mode), a.count, a.cpu)
                results[(mode, name)].append(m)
                print(f"round {r + 1} {mode:10} {name:9} {m['pps'] / 1e3:8.0f} kpps "
                      f"{m['ns_per_pkt']:6.0f} ns/pkt (softirq {m['softirq_ns']:5.0f}) "
                      f"delivered {m['delivered']:.0f} load {m['load']}", flush=True)  # fmt: skip
    med = {c: {k: statistics.median(x[k] for x in v) for k in v[0]} for c, v in results.items()}
    base = med[("-", "reflector")]["ns_per_pkt"]
    print(f"\nmedians over {a.rounds} rounds (reflector {base:.0f} ns/pkt: the generator + sink)")
    for mode in a.modes.split(","):
        row = {p: med[(mode, p)] for p in a.planes.split(",")}
        for p, m in row.items():
            print(f"  {mode:10} {p:7} {m['pps'] / 1e3:8.0f} kpps  {m['ns_per_pkt']:6.0f} ns/pkt  "
                  f"LB {m['ns_per_pkt'] - base:6.0f} ns/pkt")  # fmt: skip
        if "xdp" in row and "kernel" in row:
            x, k = row["xdp"], row["kernel"]
            print(f"  {mode:10} xdp/kernel: {x['pps'] / k['pps']:.2f}x pps, "
                  f"{(k['ns_per_pkt'] - base) / max(x['ns_per_pkt'] - base, 1):.2f}x packets "
                  "per LB CPU-second")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
