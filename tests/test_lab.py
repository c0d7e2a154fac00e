"""`v6lb lab up|down|status|exec` with real curl requests through the kernel data plane.

The root test builds ``examples/lab-modes.yaml`` (client, router, LB, three pods and
an NPT server) under a lab name
unique to this run, then from the client namespace, via ``v6lb lab exec``:

* GETs and a 100 KB POST (larger than the 1400-byte path MTU) to the nat,
  dsr-srv6, dsr-ip6ip6 and dsr-l2 VIPs: each backend saw the client's own address, the
  nat backend was reached at its own address, the DSR backends at the VIP;
* the same to the NPT-mapped address of the inside server, which sees the client;
  the server's own request to a listener on the client arrives from its mapped
  address (:meth:`NptMapping.translate`);
* ``lab status --json`` shows every node and live process and the LB's VIPs.

The fixture's teardown always runs ``lab down``; the test then checks that no
namespace, interface, nft table or lab dir is left. The plan tests need no root.
Addresses: 2001:db8::/32 and fd00::/8 only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from v6lb.core.nptv6 import NptMapping
from v6lb.lab.plan import LAB_ROOT, LabError, check_name, default_name, plan_lab
from v6lb.model.config import parse_config
from v6lb.model.topology import require_topology

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lab-modes.yaml"
V6LB = [sys.executable, "-m", "v6lb.cli"]
CLIENT = "2001:db8:1::100"
VIPS = {
    "web-nat": "2001:db8:100::80",
    "web-srv6": "2001:db8:100::81",
    "web-ip6ip6": "2001:db8:100::82",
    "web-l2": "2001:db8:100::83",
}
PODS = {"fd00:20::a", "fd00:20::b", "fd00:20::c"}
NPT_SERVER = "fd00:21::5"


def _raw(drop_l2: bool = True) -> dict[str, Any]:
    raw = yaml.safe_load(EXAMPLE.read_text())
    if drop_l2:
        raw["vips"] = [v for v in raw["vips"] if v["mode"] != "dsr-l2"]
    return raw


def v6lb(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*V6LB, *args], capture_output=True, text=True, timeout=timeout)
    assert not check or r.returncode == 0, f"v6lb {' '.join(args)}: {r.stderr}"
    return r


# --- the plan (no root) ---------------------------------------------------------


def test_plan_names_routes_and_derived_files(tmp_path: Path) -> None:
    raw = _raw(drop_l2=False)
    config = parse_config(raw, str(EXAMPLE))
    topo = require_topology(config)
    plan = plan_lab(config, topo, "abc", root=tmp_path)
    assert plan.namespaces["client"] == "v6lb-abc-client" and plan.switch_ns == "v6lb-abc--sw"
    assert all(i.name.startswith("v6lb-") and i.port.startswith("v6lb-") for i in plan.ifaces)
    assert all(len(i.name) <= 15 and len(i.port) <= 15 for i in plan.ifaces)
    assert plan.forwarding == {"rtr", "lb"}
    assert (
        "default from 2001:db8:100::/64 via fd00:20::fe dev v6lb-pods proto 0x77"
        in (plan.routes["be1"])
    )
    lb = plan.lb_configs["lb"].lb
    assert lb.interfaces == ("v6lb-edge", "v6lb-pods", "v6lb-npt-lan")
    assert lb.control_socket == str(tmp_path / "abc" / "lb.sock")
    l2 = next(v for v in plan.lb_configs["lb"].vips if v.mode == "dsr-l2")
    assert all(b.mac is not None and b.mac.startswith("02:76:6c:") for b in l2.backends)
    # tunnel end points listed as loopbacks are routed to the pod, not assigned on it
    assert plan.loopbacks["be1"] == ()
    assert {(n, str(a)) for n, a, _ in plan.dsr_backends} >= {
        ("be1", "fd00:20::a"),
        ("be1", "fd00:61::1"),
    }
    assert {s.node for s in plan.servers} == {"be1", "be2", "be3", "srv"}


def test_plan_multipath_route_puts_options_before_nexthops(tmp_path: Path) -> None:
    # ip(8) takes route options (proto) only before the first `nexthop`.
    path = EXAMPLE.parent / "eks-ipv6.yaml"
    raw = yaml.safe_load(path.read_text())
    config = parse_config(raw, str(path))
    plan = plan_lab(config, require_topology(config), "abc", root=tmp_path)
    multi = [line for lines in plan.routes.values() for line in lines if "nexthop" in line]
    assert multi, "eks-ipv6.yaml has an ECMP route"
    for line in multi:
        words = line.split()
        assert words.index("proto") < words.index("nexthop")
        assert words.count("nexthop") >= 2 and words.count("dev") == words.count("nexthop")


def test_names() -> None:
    assert default_name("examples/lab-modes.yaml") == "labmodes"
    assert check_name("x1") == "x1"
    with pytest.raises(LabError, match="not valid"):
        check_name("a-b")


# --- the real lab (root) ----------------------------------------------------------


def _leftovers(name: str) -> list[str]:
    out: list[str] = []
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out += [line for line in ns.splitlines() if line.startswith(f"v6lb-{name}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    out += [line for line in links.splitlines() if "v6lb-" in line]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    out += [line for line in tables.splitlines() if "v6lb" in line]
    if (LAB_ROOT / name).exists():
        out.append(str(LAB_ROOT / name))
    return out


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"t{os.getpid() % 100000}"
    path = tmp_path / "lab-modes.yaml"
    path.write_text(yaml.safe_dump(_raw(drop_l2=False)))
    before = [line for line in _leftovers(name) if "v6lb-" in line and name not in line]
    try:
        yield name, path
    finally:
        v6lb("lab", "down", "--name", name, check=False)
    assert [line for line in _leftovers(name) if line not in before] == []


def curl(name: str, url: str, *extra: str) -> dict[str, Any]:
    r = v6lb(
        "lab", "exec", "--name", name, "client", "--", "curl", "-6", "-s", "-m", "10", *extra, url
    )
    return json.loads(r.stdout)


@pytest.mark.root
def test_lab_modes_with_curl(lab: tuple[str, Path], tmp_path: Path) -> None:
    name, path = lab
    v6lb("lab", "up", str(path), "--name", name)
    body = tmp_path / "body"
    body.write_bytes(os.urandom(100_000))
    seen: dict[str, set[str]] = {}
    for vip_name, vip in VIPS.items():
        for i in range(4):
            got = curl(name, f"http://[{vip}]/?n={i}")
            assert got["peer"][0] == CLIENT, got  # nat (no snat) and DSR keep the client
            seen.setdefault(vip_name, set()).add(got["server"])
            local = got["local"][0]
            assert local == (got["server"] if vip_name == "web-nat" else vip), got
        post = curl(name, f"http://[{vip}]/upload", "--data-binary", f"@{body}")
        assert post["method"] == "POST" and post["body_len"] == 100_000, post
        assert post["peer"][0] == CLIENT and post["server"] in PODS
    assert all(s <= PODS for s in seen.values()), seen

    # npt: the client reaches the inside server at its mapped address and is seen as itself
    mapping = NptMapping("fd00:21::/64", "2001:db8:21::/64")
    outside = str(mapping.translate(NPT_SERVER))
    got = curl(name, f"http://[{outside}]/")
    assert got["local"][0] == NPT_SERVER and got["peer"][0] == CLIENT, got
    post = curl(name, f"http://[{outside}]/", "--data-binary", f"@{body}")
    assert post["body_len"] == 100_000
    # ...and the server's own connection out arrives from its mapped address
    ready = tmp_path / "ready"
    listener = subprocess.Popen(
        [*V6LB, "lab", "exec", "--name", name, "client", "--", sys.executable, "-m",
         "v6lb.lab.httpd", "--node", "client", "--address", CLIENT, "--port", "8080",
         "--ready", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        r = v6lb("lab", "exec", "--name", name, "srv", "--", "curl", "-6", "-s", "-m", "5",
                 f"http://[{CLIENT}]:8080/")  # fmt: skip
        assert json.loads(r.stdout)["peer"][0] == outside
    finally:
        listener.terminate()
        listener.wait(10)

    st = json.loads(v6lb("lab", "status", "--name", name, "--json").stdout)
    assert all(n["netns_present"] for n in st["nodes"].values())
    assert all(p["alive"] for p in st["processes"])
    vips = {v["name"]: v for v in st["lbs"]["lb"]["status"]["vips"]}
    assert set(vips) == set(VIPS)
    assert vips["web-nat"]["packets"] >= 5
    assert set(vips["web-nat"]["backends"].values()) == {"up"}
    # exec passes the exit code through; a second `up` of the same name is refused
    assert (
        v6lb(
            "lab", "exec", "--name", name, "client", "--", "sh", "-c", "exit 7", check=False
        ).returncode
        == 7
    )
    assert v6lb("lab", "up", str(path), "--name", name, check=False).returncode == 2
    v6lb("lab", "down", "--name", name)
    assert _leftovers(name) == []
    assert "nothing to remove" in v6lb("lab", "down", "--name", name).stdout
