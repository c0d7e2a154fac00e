"""Kernel data plane vs plain IPv6 routing vs the smallest hand-written rules.

Method (root; needs iperf3, ``apt-get install iperf3``, plus nft and ip6tables):
- Three namespaces ``v6lb-km-<pid>-<n>``: client, LB, backend, joined by veth
  pairs, IPv6 forwarding on in the LB; addresses and routes as in
  ``bench_tun.py`` (whose ``setup`` and ``config`` this script imports). For
  the DSR modes a third veth pair joins the backend straight to the client,
  and the backend's replies from the DSR VIPs (``default from 2001:db8:d::/64``)
  take it: the LB carries the client -> VIP direction only, as in DSR.
  The backend is set up once by ``v6lb backend`` (VIPs on lo, ``End.DT6`` for
  the SRv6 SID and the ip6ip6 end point, the nft source filter, advmss):
  the same backend side for every case.
- For each mode, three cases on the same namespaces:

  a. ``plain``: no rules at all; the traffic is routed through the LB
     namespace to the real address (nat: the backend address instead of the
     VIP; npt: the inside host talks to the outside host untranslated;
     dsr-*: a plain ``VIP/128 via BACKEND`` route on the LB).
  b. ``hand``: the smallest hand-written rule set that does the job.
     nat: one nft table, one prerouting rule
     ``ip6 daddr VIP meta l4proto { tcp, udp } th dport 5201 dnat ip6 to BACKEND``.
     npt: ip6tables ``raw`` NOTRACK for both prefixes and ``mangle`` DNPT/SNPT.
     dsr-srv6: one route ``VIP/128 encap seg6 mode encap segs SID``;
     dsr-ip6ip6: one route ``VIP/128 encap seg6 mode encap.red segs END``
     (IPv6-in-IPv6, no SRH), both with ``ip sr tunsrc`` set as v6lb sets it;
     dsr-l2: one nft netdev ingress rule
     ``ip6 daddr VIP ether saddr set LB ether daddr set BACKEND fwd to l1``.
  c. ``v6lb``: ``v6lb run FILE --dataplane kernel --netns LB`` with its full
     ruleset (nat: the unserved-port guard, the jhash, the 65537-slot Maglev
     map and the counters; npt: the same four ip6tables rules, with comments;
     dsr-*: the unserved-port guard, the jhash, the Maglev map, the counters
     and, for the tunnels, one fwmark rule and table per backend). Each VIP
     has one backend, as the hand-written rules do; one VIP per protocol
     (iperf3's TCP control connection and its UDP data).

- Per case: small UDP (``iperf3 -u -l 64 -b 0``; receiver-side packets per
  second, ``packets - lost_packets`` over the seconds) then TCP (iperf3
  defaults, one stream; receiver-side Gbit/s), SECONDS each.
- Rounds are interleaved: each of RUNS rounds runs every (mode, case) once,
  the case order rotating by one each round, so a slow moment of the shared
  machine hits the cases evenly. We report medians, min-max and the ratios of
  the medians v6lb/hand and hand/plain, and the median (min-max) of the
  per-round ratio v6lb/hand.
- For the tunnel modes, ``hand-lb`` (in the default ``--cases``) is the smallest
  hand-written rule set that picks a backend per flow, the same job as v6lb's;
  ``--cases`` can add variants of v6lb's rendered rules with one piece removed or
  moved, to see what each costs (``TUNNEL_CASES`` below).
  With extra cases a second table gives every case's median and its per-round
  ratio to ``hand`` and ``hand-lb``.
- ``--pin C,S`` passes ``-A C,S`` to iperf3 (client CPU C, server CPU S). ``0,0``
  puts the whole path (sender, the forwarding softirqs, receiver) on one CPU:
  on a shared 2-CPU machine the figures are steadier than unpinned, where they
  depend on where the scheduler puts the two iperf3 processes.

Run: ``sudo .venv/bin/python benchmarks/bench_kernel_modes.py [--runs 5] [--seconds 3]``,
or ``... --modes dsr-srv6,dsr-ip6ip6 --cases plain,hand,v6lb,hand-lb --pin 0,0``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tun import (  # noqa: E402
    BACKEND,
    INSIDE,
    INSIDE_HOST,
    OUTSIDE,
    OUTSIDE_HOST,
    V6LB,
    VIP,
    config,
    namespaces,
    nsx,
    setup,
    sh,
)

CASES = ("plain", "hand", "v6lb")
# Extra cases for the tunnel modes (--cases): where the per-packet cost of v6lb's rules goes.
#   hand-lb: the smallest hand-written rules that pick a backend per flow (jhash -> mark,
#            one fwmark rule, one table holding the encap route);
#   rules:   v6lb's rendered ruleset and routes loaded directly (no `v6lb run` process);
#   rules-guardfirst: the same with the unserved-port guard before the mark rules and no
#            "accept" (v6lb's order until the guard was moved after them);
#   rules-noguard / rules-nocounter / rules-nomap: the same with the unserved-port guard,
#            the VIP's counter, or the 65537-slot map (the mark straight from jhash) removed;
#   v6lb-wait: `v6lb run`, then SETTLE s more before measuring.
TUNNEL_CASES = (
    "hand-lb",
    "rules",
    "rules-guardfirst",
    "rules-noguard",
    "rules-nocounter",
    "rules-nomap",
    "v6lb-wait",
)
ALL_CASES = CASES + TUNNEL_CASES
HAND_TABLE = "bench_hand"
HAND_MARK, HAND_RT = 0x1000, 100
DSR_MODES = ("dsr-srv6", "dsr-ip6ip6", "dsr-l2")
DSR_VIP = {"dsr-srv6": "2001:db8:d::81", "dsr-ip6ip6": "2001:db8:d::82", "dsr-l2": "2001:db8:d::83"}
SID = "fd00:e::100"  # the backend's End.DT6 SID (dsr-srv6), routed to it by the LB
TUNNEL_END = "fd00:e::1"  # the backend's ip6ip6 end point (End.DT6 too), routed likewise
LB_INSIDE = "2001:db8:b::1"  # the LB's address toward the backend: the tunnel source


def hand_nat() -> str:
    # One rule; the closing braces on their own lines (nft parses "ADDR }" badly).
    return (
        f"table ip6 {HAND_TABLE} {{\n"
        "  chain pre {\n"
        "    type nat hook prerouting priority dstnat;\n"
        f"    ip6 daddr {VIP} meta l4proto {{ tcp, udp }} th dport 5201 dnat ip6 to {BACKEND}\n"
        "  }\n"
        "}\n"
    )


def dsr_config(sock: str, backend_mac: str, modes: tuple[str, ...]) -> dict[str, object]:
    """The DSR VIPs of ``modes`` (one per protocol each), one backend each."""
    lb: dict[str, object] = {
        "instance": f"d{os.getpid() % 100000}",
        "flow_hash_seed": 0x5EED,
        "interfaces": ["l0", "l1"],
        "addresses": ["2001:db8:a::1", LB_INSIDE],
        "control_socket": sock,
    }
    vips: list[dict[str, object]] = []
    for mode in modes:
        backend: dict[str, str] = {"address": BACKEND}
        extra: dict[str, object] = {"tunnel_source": LB_INSIDE, "mtu": 1500}
        if mode == "dsr-srv6":
            backend["sid"] = SID
        elif mode == "dsr-ip6ip6":
            backend = {"address": TUNNEL_END}
        else:
            backend["mac"] = backend_mac
            extra = {}
        for proto in ("udp", "tcp"):
            vips.append(
                {
                    "name": f"{mode.replace('dsr-', '')}-{proto}",
                    "address": DSR_VIP[mode],
                    "ports": [5201],
                    "protocol": proto,
                    "mode": mode,
                    "health": {"type": "none"},
                    "backends": [backend],
                    **extra,
                }
            )
    return {"lb": lb, "vips": vips}


def setup_dsr(ns: dict[str, str], tmp: Path) -> str:
    """The direct reply link, the LB's routes to the tunnel ends, `v6lb backend`; the MAC."""
    c, lb, b = ns["client"], ns["lb"], ns["backend"]
    sh("ip", "link", "add", "c1", "netns", c, "type", "veth", "peer", "name", "b1", "netns", b)
    nsx(c, "ip", "link", "set", "c1", "up")
    nsx(b, "ip", "link", "set", "b1", "up")
    nsx(c, "ip", "-6", "address", "add", "2001:db8:c::1/64", "dev", "c1", "nodad")
    nsx(b, "ip", "-6", "address", "add", "2001:db8:c::2/64", "dev", "b1", "nodad")
    nsx(b, "ip", "-6", "route", "add", "default", "from", "2001:db8:d::/64",
        "via", "2001:db8:c::1", "dev", "b1")  # fmt: skip
    nsx(lb, "ip", "-6", "route", "add", "fd00:e::/64", "via", BACKEND, "dev", "l1")
    link = json.loads(nsx(b, "ip", "-j", "link", "show", "b0"))
    mac = str(link[0]["address"])
    path = tmp / "backend.yaml"
    for k, address in enumerate((BACKEND, TUNNEL_END)):
        cfg = dsr_config(str(tmp / "backend.sock"), mac, DSR_MODES)
        cfg["lb"]["instance"] = f"bk{k}"  # type: ignore[index]
        path.write_text(yaml.safe_dump(cfg))
        sh(V6LB, "backend", str(path), "--address", address, "--dev", "b0", "--netns", b)
    return mac


def hand_dsr(lb: str, mode: str) -> None:
    vip = DSR_VIP[mode]
    if mode == "dsr-l2":
        l1 = json.loads(nsx(lb, "ip", "-j", "link", "show", "l1"))[0]["address"]
        mac = _BACKEND_MAC[0]
        nsx(lb, "nft", "-f", "-", stdin=(
            f"table netdev {HAND_TABLE} {{\n"
            "  chain in {\n"
            '    type filter hook ingress device "l0" priority filter;\n'
            f'    ip6 daddr {vip} ether saddr set {l1} ether daddr set {mac} fwd to "l1"\n'
            "  }\n"
            "}\n"
        ))  # fmt: skip
        return
    how = "encap" if mode == "dsr-srv6" else "encap.red"
    end = SID if mode == "dsr-srv6" else TUNNEL_END
    nsx(lb, "ip", "sr", "tunsrc", "set", LB_INSIDE)
    nsx(lb, "ip", "-6", "route", "replace", f"{vip}/128", "encap", "seg6", "mode", how,
        "segs", end, "dev", "l1")  # fmt: skip


_BACKEND_MAC: list[str] = []
PIN = ""  # iperf3 -A: "0,1" pins the client to CPU 0 and the server to CPU 1


def hand_lb(lb: str, mode: str) -> None:
    """Per-flow backend selection by hand: jhash -> mark, one fwmark rule, one table."""
    vip = DSR_VIP[mode]
    how = "encap" if mode == "dsr-srv6" else "encap.red"
    end = SID if mode == "dsr-srv6" else TUNNEL_END
    nsx(lb, "nft", "-f", "-", stdin=(
        f"table ip6 {HAND_TABLE} {{\n"
        "  chain pre {\n"
        "    type filter hook prerouting priority mangle;\n"
        f"    ip6 daddr {vip} meta mark set jhash ip6 saddr . ip6 daddr . th sport . th dport"
        f" mod 1 seed 0x5eed offset {HAND_MARK:#x}\n"
        "  }\n"
        "}\n"
    ))  # fmt: skip
    nsx(lb, "ip", "sr", "tunsrc", "set", LB_INSIDE)
    nsx(lb, "ip", "-6", "route", "replace", f"{vip}/128", "encap", "seg6", "mode", how,
        "segs", end, "dev", "l1", "table", str(HAND_RT))  # fmt: skip
    nsx(lb, "ip", "-6", "rule", "add", "fwmark", f"{HAND_MARK:#x}", "lookup", str(HAND_RT),
        "pref", "7600")  # fmt: skip


def rendered(mode: str, variant: str, sock: str) -> tuple[str, str]:
    """v6lb's nft text and route batch for ``mode``, with one piece taken out (``variant``)."""
    from v6lb.model.config import parse_config
    from v6lb.render.nftables import render_nft, vip_object_name
    from v6lb.render.routes import render_lb_routes, tunnel_targets

    config = parse_config(dsr_config(sock, _BACKEND_MAC[0], (mode,)))
    nft = render_nft(config)
    marks = {vip_object_name(config, t.vip): t.mark for t in tunnel_targets(config)}
    lines = []
    for line in nft.splitlines():
        if variant == "noguard" and '_unserved" drop' in line:
            continue
        if variant == "nocounter" and "jhash" in line:
            line = re.sub(r'counter name "\w+" ', "", line)
        if variant == "nomap" and "jhash" in line:
            name = re.search(r"map @(\w+)", line)
            assert name is not None
            line = re.sub(
                r"mod \d+ (seed \w+) meta mark set meta mark map @\w+",
                rf"mod 1 \1 offset {marks[name.group(1)]:#x}",
                line,
            )
        if variant == "guardfirst" and "jhash" in line:  # the order before the change
            line = line.replace(" accept comment", " comment")
        lines.append(line)
    if variant == "guardfirst":
        guards = [i for i, line in enumerate(lines) if '_unserved" drop' in line]
        first = min(i for i, line in enumerate(lines) if "jhash" in line)
        moved = [lines[i] for i in guards]
        rest = [line for i, line in enumerate(lines) if i not in guards]
        lines = rest[:first] + moved + rest[first:]
    return "\n".join(lines) + "\n", render_lb_routes(config)


def load_rendered(lb: str, nft: str, batch: str) -> None:
    nsx(lb, "nft", "-f", "-", stdin=nft)
    nsx(lb, "ip", "-6", "-batch", "-", stdin=batch)


def flush_rules(lb: str) -> None:
    """The fwmark rules (pref 7600) and their tables, of hand-lb and of the rendered cases."""
    for _ in range(64):
        r = subprocess.run(
            ["ip", "netns", "exec", lb, "ip", "-6", "rule", "del", "pref", "7600"],
            capture_output=True,
            timeout=30,
        )
        if r.returncode != 0:
            break
    out = subprocess.run(
        ["ip", "netns", "exec", lb, "ip", "-6", "-j", "route", "show", "table", "all"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    tables = {str(r["table"]) for r in json.loads(out or "[]") if "table" in r}
    for t in tables - {"main", "local"}:
        subprocess.run(
            ["ip", "netns", "exec", lb, "ip", "-6", "route", "flush", "table", t],
            capture_output=True,
            timeout=30,
        )
    tabs = subprocess.run(
        ["ip", "netns", "exec", lb, "nft", "-j", "list", "tables"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    for item in json.loads(tabs or "{}").get("nftables", []):
        t = item.get("table")
        if t and str(t["name"]).startswith("v6lb_"):
            subprocess.run(
                ["ip", "netns", "exec", lb, "nft", "delete", "table", t["family"], t["name"]],
                capture_output=True,
                timeout=30,
            )


def hand_npt() -> str:
    return (
        "*raw\n"
        f"-A PREROUTING -s {INSIDE} -j NOTRACK\n"
        f"-A PREROUTING -d {OUTSIDE} -j NOTRACK\n"
        "COMMIT\n"
        "*mangle\n"
        f"-A PREROUTING -d {OUTSIDE} -j DNPT --src-pfx {OUTSIDE} --dst-pfx {INSIDE}\n"
        f"-A POSTROUTING -s {INSIDE} -j SNPT --src-pfx {INSIDE} --dst-pfx {OUTSIDE}\n"
        "COMMIT\n"
    )


def snpt_packets(lb: str) -> int:
    """Packets counted by the SNPT rule(s) in the LB (proves the traffic was translated)."""
    out = nsx(lb, "ip6tables", "-t", "mangle", "-nvxL", "POSTROUTING")
    return sum(int(line.split()[0]) for line in out.splitlines() if "SNPT" in line)


def flush_hand(lb: str) -> None:
    for family in ("ip6", "netdev"):
        subprocess.run(
            ["ip", "netns", "exec", lb, "nft", "delete", "table", family, HAND_TABLE],
            capture_output=True,
            timeout=30,
        )
    for vip in DSR_VIP.values():  # the plain and hand-written DSR routes
        subprocess.run(
            ["ip", "netns", "exec", lb, "ip", "-6", "route", "del", f"{vip}/128"],
            capture_output=True,
            timeout=30,
        )
    for table in ("raw", "mangle"):
        subprocess.run(
            ["ip", "netns", "exec", lb, "ip6tables", "-t", table, "-F"],
            capture_output=True,
            timeout=30,
        )


def wait_v6lb(run: subprocess.Popen[str], lb: str, mode: str, instance: str, sock: str) -> None:
    """Until the ruleset is in the kernel (the socket opens before the apply)."""
    deadline = time.monotonic() + 30
    while True:
        if run.poll() is not None:
            raise RuntimeError(f"v6lb run stopped: {run.stderr.read() if run.stderr else ''}")
        if mode == "npt":
            ready = f"v6lb:{instance}" in nsx(lb, "ip6tables-save", "-t", "mangle")
        else:  # the socket answers once the apply is done (it is served after it)
            r = subprocess.run(
                [V6LB, "status", "--control-socket", sock, "--json"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            ready = r.returncode == 0
        if ready:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("v6lb run did not apply its ruleset in 30 s")
        time.sleep(0.1)


def v6lb_counters(lb: str, instance: str) -> dict[str, int]:
    """Packets of each named counter in v6lb's ip6 table (forward_denied, conntrack_full, ...)."""
    out = nsx(lb, "nft", "-j", "list", "counters", "table", "ip6", f"v6lb_{instance}")
    return {
        str(item["counter"]["name"]): int(item["counter"]["packets"])
        for item in json.loads(out).get("nftables", [])
        if "counter" in item
    }


def iperf(ns: dict[str, str], mode: str, case: str, udp: bool, seconds: float) -> float:
    """Receiver-side packets/s (udp) or bit/s (tcp) of one iperf3 run."""
    if mode == "nat":
        client_ns, bind = ns["client"], []
        target = BACKEND if case == "plain" else VIP
    elif mode in DSR_MODES:
        client_ns, bind, target = ns["client"], [], DSR_VIP[mode]
    else:
        client_ns, bind, target = ns["backend"], ["-B", INSIDE_HOST], OUTSIDE_HOST
    extra = ["-u", "-l", "64", "-b", "0"] if udp else []
    pin = ["-A", PIN] if PIN else []
    argv = ["iperf3", "-c", target, *bind, *extra, *pin, "-t", str(seconds), "--json"]
    last = ""
    for _ in range(3):  # a wedged or busy server: wait and try again
        r = subprocess.run(
            ["ip", "netns", "exec", client_ns, *argv], capture_output=True, text=True, timeout=120
        )
        doc = json.loads(r.stdout or "{}")
        end = doc.get("end", {})
        if udp and "sum" in end:
            s = end["sum"]
            return (int(s["packets"]) - int(s["lost_packets"])) / float(s["seconds"])
        if not udp and "sum_received" in end:
            return float(end["sum_received"]["bits_per_second"])
        last = doc.get("error", r.stderr[-300:])
        time.sleep(1.0)
    raise RuntimeError(f"iperf3 {mode}/{case}: {last}")


def one_case(
    ns: dict[str, str], mode: str, case: str, seconds: float, tmp: Path, settle: float = 3.0
) -> tuple[float, float]:
    lb = ns["lb"]
    run: subprocess.Popen[str] | None = None
    try:
        if case == "plain" and mode in DSR_MODES:
            nsx(lb, "ip", "-6", "route", "replace", f"{DSR_VIP[mode]}/128", "via", BACKEND)
        elif case == "hand":
            if mode == "nat":
                nsx(lb, "nft", "-f", "-", stdin=hand_nat())
            elif mode in DSR_MODES:
                hand_dsr(lb, mode)
            else:
                nsx(lb, "ip6tables-restore", "--noflush", stdin=hand_npt())
        elif case == "hand-lb":
            hand_lb(lb, mode)
        elif case.startswith("rules"):
            variant = case.partition("-")[2]
            load_rendered(lb, *rendered(mode, variant, str(tmp / f"{mode}.sock")))
            time.sleep(settle)
        elif case in ("v6lb", "v6lb-wait"):
            sock = str(tmp / f"{mode}.sock")
            cfg: dict[str, Any] = (
                dsr_config(sock, _BACKEND_MAC[0], (mode,))
                if mode in DSR_MODES
                else config(mode, sock)
            )
            path = tmp / f"{mode}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            run = subprocess.Popen(
                [V6LB, "run", str(path), "--dataplane", "kernel", "--netns", lb],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            wait_v6lb(run, lb, mode, cfg["lb"]["instance"], sock)
            if case == "v6lb-wait":
                time.sleep(settle)
        before = snpt_packets(lb) if mode == "npt" and case != "plain" else 0
        pps = iperf(ns, mode, case, True, seconds)
        bps = iperf(ns, mode, case, False, seconds)
        if mode == "npt" and case != "plain" and snpt_packets(lb) <= before:
            raise RuntimeError(f"npt/{case}: the SNPT rule counted nothing")
        if run is not None:  # the forward filter must pass all of the benchmark's traffic
            counts = v6lb_counters(lb, cfg["lb"]["instance"])
            print(f"  {mode}/{case} v6lb counters: {counts}", flush=True)
            if counts.get("forward_denied") or counts.get("conntrack_full"):
                raise RuntimeError(f"{mode}/{case}: v6lb dropped benchmark traffic: {counts}")
        return pps, bps
    finally:
        if run is not None:
            run.send_signal(signal.SIGTERM)
            run.wait(timeout=60)
        flush_hand(lb)
        if case == "hand-lb" or case.startswith("rules"):
            flush_rules(lb)


def stat(xs: list[float], scale: float, fmt: str) -> str:
    return (
        f"{statistics.median(xs) / scale:{fmt}} ({min(xs) / scale:{fmt}}–{max(xs) / scale:{fmt}})"
    )


def paired(num: list[float], den: list[float]) -> str:
    """Median (min-max) of the per-round ratios: both runs of a round shared the moment."""
    rs = [n / d for n, d in zip(num, den, strict=True)]
    return f"{statistics.median(rs):.2f} ({min(rs):.2f}–{max(rs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--modes", default="nat,npt,dsr-srv6,dsr-ip6ip6,dsr-l2")
    ap.add_argument(
        "--cases",
        default=",".join((*CASES, "hand-lb")),
        help=f"comma-separated, of {', '.join(ALL_CASES)}; the extra ones run for the tunnel"
        " modes only (default: plain,hand,v6lb,hand-lb)",
    )
    ap.add_argument(
        "--settle", type=float, default=3.0, help="seconds to wait in v6lb-wait and rules-*"
    )
    ap.add_argument(
        "--pin",
        default="",
        metavar="C,S",
        help="iperf3 -A C,S: client on CPU C, server on CPU S (default: not pinned)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the raw figures here")
    args = ap.parse_args()
    global PIN
    PIN = args.pin
    if os.geteuid() != 0 or shutil.which("iperf3") is None:
        print("needs root and iperf3 (apt-get install iperf3)", file=sys.stderr)
        return 2
    modes = args.modes.split(",")
    cases = tuple(args.cases.split(","))
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown:
        ap.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(ALL_CASES)}")

    def mode_cases(mode: str) -> tuple[str, ...]:
        tunnel = mode in ("dsr-srv6", "dsr-ip6ip6")
        return tuple(c for c in cases if c in CASES or tunnel)

    res: dict[str, dict[str, dict[str, list[float]]]] = {
        m: {c: {"pps": [], "bps": []} for c in mode_cases(m)} for m in modes
    }
    servers: list[subprocess.Popen[bytes]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        namespaces("client", "lb", "backend", tag="km") as ns,
    ):
        try:
            setup(ns)
            if any(m in DSR_MODES for m in modes):
                _BACKEND_MAC.append(setup_dsr(ns, Path(tmp)))
            # The backend's servers are bound to each address it serves: a UDP reply from a
            # wildcard-bound iperf3 would leave from the backend's own address, not the DSR VIP.
            binds = [(ns["client"], []), (ns["backend"], ["-B", BACKEND])]
            binds += [(ns["backend"], ["-B", DSR_VIP[m]]) for m in modes if m in DSR_MODES]
            for n, bind in binds:
                servers.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", n, "iperf3", "-s", *bind],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            time.sleep(0.5)
            for i in range(args.runs):
                for mode in modes:
                    order = mode_cases(mode)
                    k = i % len(order)
                    for case in order[k:] + order[:k]:
                        pps, bps = one_case(ns, mode, case, args.seconds, Path(tmp), args.settle)
                        res[mode][case]["pps"].append(pps)
                        res[mode][case]["bps"].append(bps)
                        print(
                            f"round {i + 1} {mode:10} {case:15} {pps / 1000:7.1f} kpps"
                            f" {bps / 1e9:6.2f} Gbit/s",
                            flush=True,
                        )
        finally:
            for s in servers:
                s.kill()
                s.wait(timeout=10)
    print(
        f"\n{platform.python_implementation()} {platform.python_version()},"
        f" {os.cpu_count()} CPUs, Linux {platform.release()}, load average"
        f" {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"{args.runs} interleaved rounds, {args.seconds:g} s per run;"
        " UDP 64-byte payloads, TCP one stream\n"
    )
    metrics = (("pps", "UDP kpps", 1e3, ".1f"), ("bps", "TCP Gbit/s", 1e9, ".2f"))
    if all(c in cases for c in CASES):
        print(
            "| mode | metric | (a) plain routing | (b) hand-written | (c) v6lb kernel"
            " | c/b | b/a | c/a | c/b per round |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for mode in modes:
            for key, label, scale, fmt in metrics:
                a, b, c = (res[mode][case][key] for case in CASES)
                ma, mb, mc = (statistics.median(x) for x in (a, b, c))
                print(
                    f"| {mode} | {label} | {stat(a, scale, fmt)} | {stat(b, scale, fmt)}"
                    f" | {stat(c, scale, fmt)} | {mc / mb:.2f} | {mb / ma:.2f} | {mc / ma:.2f}"
                    f" | {paired(c, b)} |"
                )
    refs = [r for r in ("hand", "hand-lb") if r in cases]
    if any(c not in CASES for c in cases) and refs:
        print("\n| mode | metric | case | median (min–max) | " + " | ".join(
            f"/{r} per round" for r in refs) + " |")  # fmt: skip
        print("|---|---|---|---|" + "---|" * len(refs))
        for mode in modes:
            for key, label, scale, fmt in metrics:
                for case in mode_cases(mode):
                    xs = res[mode][case][key]
                    ratios = " | ".join(
                        paired(xs, res[mode][r][key]) if r in res[mode] else "–" for r in refs
                    )
                    print(f"| {mode} | {label} | {case} | {stat(xs, scale, fmt)} | {ratios} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
