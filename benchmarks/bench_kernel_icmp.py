"""Per-packet cost of the ICMPv6 error path in the kernel data plane (DSR VIPs).

The issue asks for the per-packet cost of the ICMP path in both data planes; the Python
core's figure is in ``bench_dsr.py``. This script measures the kernel's.

Method (root; nft and ip):
- Three namespaces ``v6lb-ki-<pid>-<n>``: client, LB, backend, joined by veth pairs
  (``c0``-``l0``, ``l1``-``b0``), set up by ``bench_tun.setup`` and
  ``bench_kernel_modes.setup_dsr`` (the backend's direct link to the client, the LB's
  route to the tunnel ends, ``v6lb backend`` for the DSR VIPs).
- Per mode (``--modes``), ``v6lb run FILE --dataplane kernel --netns LB`` with the
  file of ``bench_kernel_modes.dsr_config``: one VIP per protocol (udp and tcp,
  port 5201), one backend.
- Packets, built once with scapy (the oracle, never the data path), all 1280 bytes
  of IPv6 (the size of a router's Packet Too Big), sent as raw Ethernet frames:

  * ``icmp``: a Packet Too Big (mtu 1280) from a router to the VIP, quoting the first
    1232 bytes of the backend's 1500-byte reply VIP:5201 -> client:cport. In v6lb:
    mangle_pre's balancing rules miss, the jump to ``icmp_errors``, the quote's
    match, jhash over the quote, the Maglev map, then the fwmark rule and the
    per-backend encap route (dsr-l2: the netdev ingress chain ``icmp_errors_l2``,
    MAC rewrite and ``fwd``).
  * ``data``: a UDP (or TCP ACK, ``--protos tcp``) packet client:cport -> VIP:5201
    with 1232 bytes of payload: the balancing rule (jhash over the 4-tuple, map),
    the fwmark rule, the encap route.

  FLOWS (client, cport) pairs, random in 2001:db8:100::/64; the ``icmp`` packets
  quote exactly the ``data`` flows.
- Cases, on the same namespaces: ``icmp`` and ``data`` through ``v6lb run``; and,
  unless ``--no-plain``, the same two packets plainly routed (v6lb stopped, one route
  ``VIP/128 via BACKEND`` in the LB, no rules, no conntrack): the floor.
- Each case: first every ``data`` packet once (neighbour discovery is done before
  the clock starts), then a sender in the client namespace, pinned to one CPU
  (``--cpu``), sends the case's frames in turn through an AF_PACKET socket on ``c0``
  (qdisc bypassed) as fast as it can for SECONDS. Over veth the LB's forwarding and
  the backend's receive run in the sender's softirq on the same CPU, so the rate
  reflects sender + LB + backend receive.
- Conntrack is on in the LB (v6lb's forward chain matches ``ct state``). In the
  tunnel modes a data packet is ``new`` at prerouting every time (its entry is
  dropped unconfirmed when the packet is encapsulated: ``conntrack -C`` stays 0) and
  an ICMP error finds no flow for its quote (``invalid``); the forward chain accepts
  both by their mark. dsr-l2 works at netdev ingress, before conntrack. The plain
  cases load no ruleset, so conntrack is off.
- The backend counts what arrives in a netdev ingress chain on ``b0`` (by outer
  destination: the SID, the ip6ip6 end point or the VIP) and drops it there (unless
  ``--deliver``), so its cost is small and the same in every case. Arrived packets/s
  = that count / the sender's seconds; ns per packet = 1e9 / that rate.
- Checks, per case: the LB's ``l0`` received N packets; in ``icmp`` the VIP's
  ``<vip>_icmp`` counter counted all N (and the data counter and
  ``_icmp_unmatched`` none); in ``data`` the VIP's counter all N (``_icmp`` none);
  the backend received all N (by the right outer destination). A small slack
  (``SLACK``) allows for stray neighbour discovery.
- Rounds are interleaved: each of RUNS rounds runs, per mode, the v6lb block (one
  ``v6lb run``: icmp and data) and the plain block, the block order and the case
  order within a block alternating each round. Reported: per case, arrived kpps and
  ns/packet, median (min-max); per round, ICMP ÷ data (packets/s), ICMP - data (ns),
  and v6lb - plain (ns) for each packet kind; the load average before and after,
  and before each round (in the per-round lines and ``--json``).

Run: ``sudo .venv/bin/python benchmarks/bench_kernel_icmp.py [--runs 5] [--seconds 2]``,
or ``... --modes dsr-srv6,dsr-ip6ip6,dsr-l2 --protos udp,tcp --json FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernel_modes import (  # noqa: E402
    DSR_MODES,
    DSR_VIP,
    SID,
    TUNNEL_END,
    dsr_config,
    flush_hand,
    setup_dsr,
    wait_v6lb,
)
from bench_tun import BACKEND, V6LB, namespaces, nsx, setup  # noqa: E402

PORT = 5201
ROUTER = "2001:db8:ff::1"  # the router on the backend -> client path that sends the PTB
CLIENT_NET = "2001:db8:100::"  # the clients: random interface IDs in this /64
IPV6_BYTES = 1280  # every packet, icmp and data, is this long (IPv6 header included)
REPLY_BYTES = 1500  # the backend's reply the PTB quotes (its first 1232 bytes)
SINK_TABLE = "bench_icmp_sink"
SLACK = 10  # packets a check allows for stray neighbour discovery
KINDS = ("icmp", "data")
# The backend's sink counters: outer destination -> counter name.
SINK = {
    SID: "sink_sid",
    TUNNEL_END: "sink_tunnel_end",
    DSR_VIP["dsr-srv6"]: "sink_vip_srv6",
    DSR_VIP["dsr-ip6ip6"]: "sink_vip_ip6ip6",
    DSR_VIP["dsr-l2"]: "sink_vip_l2",
}
# Where a mode's forwarded packets arrive: (through v6lb, plainly routed).
ARRIVES = {
    "dsr-srv6": (SINK[SID], SINK[DSR_VIP["dsr-srv6"]]),
    "dsr-ip6ip6": (SINK[TUNNEL_END], SINK[DSR_VIP["dsr-ip6ip6"]]),
    "dsr-l2": (SINK[DSR_VIP["dsr-l2"]], SINK[DSR_VIP["dsr-l2"]]),
}


# --- the sender (runs in the client namespace, as a child process) ------------------


def sender(path: str, iface: str, cpu: int, seconds: float) -> int:
    """Send the pickled frames in turn for ``seconds`` (0: each once); print a JSON line."""
    os.sched_setaffinity(0, {cpu})
    frames: list[bytes] = pickle.loads(Path(path).read_bytes())
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing
    try:  # PACKET_QDISC_BYPASS: straight to the driver (veth has no queue anyway)
        s.setsockopt(263, 20, 1)
    except OSError:
        pass
    s.bind((iface, 0))
    send = s.send
    sent = failed = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        for f in frames:
            try:
                send(f)
            except OSError:
                failed += 1
        sent += len(frames)
        if time.perf_counter() >= end:
            break
    elapsed = time.perf_counter() - t0
    print(json.dumps({"sent": sent - failed, "failed": failed, "seconds": elapsed}))
    return 0


# --- setup ------------------------------------------------------------------------


def sink(backend: str, deliver: bool) -> None:
    """Count (and drop, unless ``deliver``) what reaches the backend, by outer destination."""
    verdict = "accept" if deliver else "drop"
    lines = [f"table netdev {SINK_TABLE} {{"]
    lines += [f"  counter {name} {{\n  }}" for name in SINK.values()]
    lines += ["  chain in {", '    type filter hook ingress device "b0" priority -500;']
    lines += [f'    ip6 daddr {a} counter name "{n}" {verdict}' for a, n in SINK.items()]
    lines += ["  }", "}"]
    nsx(backend, "nft", "-f", "-", stdin="\n".join(lines) + "\n")


def mac_of(ns: str, dev: str) -> str:
    return str(json.loads(nsx(ns, "ip", "-j", "link", "show", dev))[0]["address"])


def clients(n: int, seed: int = 1) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out: set[tuple[str, int]] = set()
    while len(out) < n:
        iid = ":".join(f"{rng.getrandbits(16):x}" for _ in range(4))
        out.add((f"{CLIENT_NET}{iid}", rng.randrange(1024, 65536)))
    return sorted(out)


def frames(
    mode: str, proto: str, flows: list[tuple[str, int]], src_mac: str, dst_mac: str
) -> dict[str, list[bytes]]:
    """The ``icmp`` and ``data`` frames of ``mode`` / ``proto``, one per flow."""
    from scapy.layers.inet import TCP, UDP
    from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    vip = DSR_VIP[mode]
    eth = Ether(src=src_mac, dst=dst_mac)

    def l4(sport: int, dport: int) -> Any:
        if proto == "udp":
            return UDP(sport=sport, dport=dport)
        return TCP(sport=sport, dport=dport, flags="A", seq=1000, ack=2000, window=512)

    out: dict[str, list[bytes]] = {"icmp": [], "data": []}
    for client, cport in flows:
        head = IPv6(src=client, dst=vip, hlim=64) / l4(cport, PORT)
        pad = IPV6_BYTES - len(head)
        out["data"].append(bytes(eth / head / Raw(b"\xab" * pad)))
        reply = IPv6(src=vip, dst=client, hlim=64) / l4(PORT, cport)
        reply = reply / Raw(b"\xcd" * (REPLY_BYTES - len(reply)))
        quote = bytes(reply)[: IPV6_BYTES - 48]  # IPv6 header 40 + ICMPv6 header 8
        ptb = IPv6(src=ROUTER, dst=vip, hlim=64) / ICMPv6PacketTooBig(mtu=1280) / Raw(quote)
        out["icmp"].append(bytes(eth / ptb))
    for kind, fs in out.items():
        sizes = {len(f) - 14 for f in fs}
        assert sizes == {IPV6_BYTES}, f"{mode}/{proto}/{kind}: IPv6 lengths {sizes}"
    return out


# --- measuring ----------------------------------------------------------------------


def counters(ns: str) -> dict[str, int]:
    """Packets of every named nft counter in ``ns``."""
    out = nsx(ns, "nft", "-j", "list", "counters")
    return {
        str(item["counter"]["name"]): int(item["counter"]["packets"])
        for item in json.loads(out).get("nftables", [])
        if "counter" in item
    }


def rx_packets(ns: str, dev: str) -> int:
    link = json.loads(nsx(ns, "ip", "-s", "-j", "link", "show", dev))[0]
    return int(link["stats64"]["rx"]["packets"])


def send(client: str, path: Path, cpu: int, seconds: float) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--sender", str(path)]
    argv += ["--cpu", str(cpu), "--seconds", str(seconds)]
    r = subprocess.run(
        ["ip", "netns", "exec", client, *argv],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    if r.returncode != 0:
        raise RuntimeError(f"sender failed: {r.stderr[-500:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


class Names:
    """The v6lb counter names of one mode's VIPs, per protocol."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from v6lb.model.config import parse_config
        from v6lb.render.nftables import icmp_error_counter, icmp_unmatched_counter, vip_counter

        config = parse_config(cfg)
        self.data = {str(v.protocol): vip_counter(config, v) for v in config.vips}
        self.icmp = {str(v.protocol): icmp_error_counter(config, v) for v in config.vips}
        self.unmatched = icmp_unmatched_counter(config, config.vips[0])


def measure(
    ns: dict[str, str],
    mode: str,
    proto: str,
    kind: str,
    v6lb: Names | None,
    files: dict[tuple[str, str, str], Path],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One case: warm-up, SECONDS of sending, the counts checked; the figures."""
    lb, backend = ns["lb"], ns["backend"]
    send(ns["client"], files[(mode, proto, "data")], args.cpu, 0)  # conntrack, neighbours
    time.sleep(0.2)
    lb0, bk0 = counters(lb) if v6lb else {}, counters(backend)
    rx0 = rx_packets(lb, "l0")
    load = os.getloadavg()[0]
    out = send(ns["client"], files[(mode, proto, kind)], args.cpu, args.seconds)
    time.sleep(0.2)
    lb1, bk1 = counters(lb) if v6lb else {}, counters(backend)
    rx = rx_packets(lb, "l0") - rx0
    where = ARRIVES[mode][0 if v6lb else 1]
    arrived = bk1[where] - bk0[where]
    label = f"{mode}/{proto} {kind} {'v6lb' if v6lb else 'plain'}"
    if v6lb is not None:
        took = {
            "icmp": lb1[v6lb.icmp[proto]] - lb0[v6lb.icmp[proto]],
            "data": lb1[v6lb.data[proto]] - lb0[v6lb.data[proto]],
            "unmatched": lb1[v6lb.unmatched] - lb0[v6lb.unmatched],
        }
        if abs(took[kind] - rx) > SLACK or sum(took.values()) - took[kind] > SLACK:
            raise RuntimeError(f"{label}: {rx} packets reached the LB, its counters: {took}")
        counted = took[kind]
    else:
        counted = rx
    if abs(arrived - counted) > SLACK:
        raise RuntimeError(f"{label}: the LB forwarded {counted}, {arrived} reached the backend")
    if rx < out["sent"] * 0.5:
        raise RuntimeError(f"{label}: sent {out['sent']}, only {rx} reached the LB")
    rate = arrived / out["seconds"]
    return {
        "pps": rate,
        "ns": 1e9 / rate,
        "sent": out["sent"],
        "send_failed": out["failed"],
        "lb_rx": rx,
        "lb_counted": counted,
        "arrived": arrived,
        "seconds": out["seconds"],
        "load1": load,
    }


def v6lb_block(
    ns: dict[str, str],
    mode: str,
    items: list[tuple[str, str]],
    tmp: Path,
    mac: str,
    files: dict[tuple[str, str, str], Path],
    args: argparse.Namespace,
) -> dict[tuple[str, str], dict[str, Any]]:
    sock = str(tmp / f"{mode}.sock")
    cfg: dict[str, Any] = dsr_config(sock, mac, (mode,))
    names = Names(cfg)
    path = tmp / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = subprocess.Popen(
        [V6LB, "run", str(path), "--dataplane", "kernel", "--netns", ns["lb"]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_v6lb(run, ns["lb"], mode, str(cfg["lb"]["instance"]), sock)
        return {(p, k): measure(ns, mode, p, k, names, files, args) for p, k in items}
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
            try:
                run.wait(timeout=60)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait(timeout=10)
        flush_hand(ns["lb"])


def plain_block(
    ns: dict[str, str],
    mode: str,
    items: list[tuple[str, str]],
    files: dict[tuple[str, str, str], Path],
    args: argparse.Namespace,
) -> dict[tuple[str, str], dict[str, Any]]:
    nsx(ns["lb"], "ip", "-6", "route", "replace", f"{DSR_VIP[mode]}/128", "via", BACKEND)
    try:
        return {(p, k): measure(ns, mode, p, k, None, files, args) for p, k in items}
    finally:
        flush_hand(ns["lb"])


# --- report -------------------------------------------------------------------------


def stat(xs: list[float], fmt: str) -> str:
    return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}–{max(xs):{fmt}})"


def loads() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def ratio(num: list[dict[str, Any]], den: list[dict[str, Any]]) -> str:
    """Median (min-max) of the per-round ratios of packets/s (both ran in the same round)."""
    return stat([x["pps"] / y["pps"] for x, y in zip(num, den, strict=True)], ".3f")


def diff(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    """Median (min-max) of the per-round differences of ns per packet."""
    return stat([x["ns"] - y["ns"] for x, y in zip(a, b, strict=True)], ".0f")


def report(res: dict[str, dict[str, list[dict[str, Any]]]], plain: bool) -> None:
    print("| target | case | arrived kpps | ns/packet | lost (sent - arrived) |")
    print("|---|---|---|---|---|")
    for target, cases in res.items():
        for case, runs in cases.items():
            kpps = [r["pps"] / 1e3 for r in runs]
            ns = [r["ns"] for r in runs]
            lost = sum(r["sent"] - r["arrived"] for r in runs) / sum(r["sent"] for r in runs)
            print(f"| {target} | {case} | {stat(kpps, '.1f')} | {stat(ns, '.0f')} | {lost:.2%} |")
    head = "| target | ICMP ÷ data, pps per round | ICMP − data, ns per round |"
    rule = "|---|---|---|"
    if plain:
        head += " v6lb − plain ns, ICMP | v6lb − plain ns, data |"
        rule += "---|---|"
    print(f"\n{head}\n{rule}")
    for target, c in res.items():
        line = f"| {target} | {ratio(c['icmp v6lb'], c['data v6lb'])}"
        line += f" | {diff(c['icmp v6lb'], c['data v6lb'])} |"
        if plain:
            line += f" {diff(c['icmp v6lb'], c['icmp plain'])}"
            line += f" | {diff(c['data v6lb'], c['data plain'])} |"
        print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--modes", default="dsr-srv6,dsr-l2", help="of " + ", ".join(DSR_MODES))
    ap.add_argument("--protos", default="udp", help="udp, tcp or udp,tcp (the flows' protocol)")
    ap.add_argument("--flows", type=int, default=1024, help="client flows (default 1024)")
    ap.add_argument("--cpu", type=int, default=0, help="the sender's CPU (default 0)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-routing floor")
    ap.add_argument(
        "--deliver", action="store_true", help="let the backend receive the packets (no drop)"
    )
    ap.add_argument("--json", metavar="FILE", help="also write the raw figures here")
    ap.add_argument("--sender", metavar="FRAMES", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sender:
        return sender(args.sender, "c0", args.cpu, args.seconds)
    if os.geteuid() != 0:
        print("needs root (network namespaces, nft)", file=sys.stderr)
        return 2
    modes = args.modes.split(",")
    protos = args.protos.split(",")
    if set(modes) - set(DSR_MODES) or set(protos) - {"udp", "tcp"}:
        ap.error(f"--modes: of {', '.join(DSR_MODES)}; --protos: of udp, tcp")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks run
    load_before = loads()
    targets = [(m, p) for m in modes for p in protos]
    res: dict[str, dict[str, list[dict[str, Any]]]] = {
        f"{m}/{p}": {
            f"{k} {c}": [] for c in ("v6lb", "plain")[: 1 if args.no_plain else 2] for k in KINDS
        }
        for m, p in targets
    }
    with (
        tempfile.TemporaryDirectory() as tmpdir,
        namespaces("client", "lb", "backend", tag="ki") as ns,
    ):
        tmp = Path(tmpdir)
        setup(ns)
        mac = setup_dsr(ns, tmp)
        sink(ns["backend"], args.deliver)
        src_mac, dst_mac = mac_of(ns["client"], "c0"), mac_of(ns["lb"], "l0")
        flows = clients(args.flows)
        files: dict[tuple[str, str, str], Path] = {}
        for m, p in targets:
            for kind, fs in frames(m, p, flows, src_mac, dst_mac).items():
                files[(m, p, kind)] = tmp / f"{m}-{p}-{kind}.pickle"
                files[(m, p, kind)].write_bytes(pickle.dumps(fs))
        for i in range(args.runs):
            print(f"round {i + 1}: load average {loads()}", flush=True)
            for mode in modes:
                items = [(p, k) for p in protos for k in KINDS]
                k = i % len(items)
                items = items[k:] + items[:k]
                blocks = ["v6lb"] if args.no_plain else ["v6lb", "plain"]
                if i % 2:
                    blocks.reverse()
                for block in blocks:
                    if block == "v6lb":
                        got = v6lb_block(ns, mode, items, tmp, mac, files, args)
                    else:
                        got = plain_block(ns, mode, items, files, args)
                    for (proto, kind), r in got.items():
                        res[f"{mode}/{proto}"][f"{kind} {block}"].append(r)
                        print(
                            f"  {mode}/{proto} {kind:4} {block:5} {r['pps'] / 1e3:8.1f} kpps"
                            f" {r['ns']:6.0f} ns/pkt  sent {r['sent']} LB {r['lb_counted']}"
                            f" backend {r['arrived']}  load {r['load1']:.2f}",
                            flush=True,
                        )
    load_after = loads()
    print(
        f"\n{platform.python_implementation()} {platform.python_version()},"
        f" {os.cpu_count()} CPUs, Linux {platform.release()}"
    )
    print(
        f"{args.runs} interleaved rounds, {args.seconds:g} s per case, {args.flows} flows,"
        f" {IPV6_BYTES}-byte IPv6 packets, sender on CPU {args.cpu},"
        f" backend {'delivers' if args.deliver else 'drops at ingress'}"
    )
    print(f"load average before {load_before}; after {load_after}\n")
    report(res, not args.no_plain)
    if args.json:
        doc = {
            "args": {k: v for k, v in vars(args).items() if k != "sender"},
            "load_before": load_before,
            "load_after": load_after,
            "results": res,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    rc = main()
    if rc:  # not sys.exit(0): run_all.py runs the scripts in one process
        sys.exit(rc)
