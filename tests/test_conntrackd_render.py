"""``lb.conntrack_sync``: the config (model/conntrack_sync) and conntrackd.conf (render/conntrackd).

No root, but ``test_conntrackd_accepts_the_rendered_file``. ``V6LB_UPDATE_GOLDEN=1 pytest
tests/test_conntrackd_render.py`` rewrites tests/golden/conntrackd_lb1.conf (review the
diff). tests/test_conntrackd_run.py and tests/test_anycast_sync.py run the rendered file
in namespaces; the last test here checks that the python data plane refuses the option.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest
import yaml

from v6lb.model.config import ConfigError, parse_config
from v6lb.model.config_summary import summarize
from v6lb.render.conntrackd import render_conntrackd, sync_addresses

GOLDEN = Path(__file__).parent / "golden" / "conntrackd_lb1.conf"
UPDATE = os.environ.get("V6LB_UPDATE_GOLDEN") == "1"

BASE: dict[str, Any] = {
    "lb": {
        "instance": "lb1",
        "addresses": ["2001:db8:1::2"],
        "interfaces": ["up0"],
        "conntrack_max": 100000,
        "conntrack_sync": {
            "interface": "v6lb-sync0",
            "address": "fd00:99::1",
            "peer": "fd00:99::2",
            "peer_snat": ["2001:db8:5::2"],
        },
    },
    "vips": [
        {
            "name": "web",
            "address": "2001:db8:f::80",
            "ports": [80],
            "mode": "nat",
            "snat": "2001:db8:5::1",
            "backends": [{"address": "2001:db8:1::10"}, {"address": "2001:db8:1::11"}],
        },
        {
            "name": "dsr",
            "address": "2001:db8:f::81",
            "ports": [80],
            "mode": "dsr-l2",
            "backends": [{"address": "2001:db8:1::12", "mac": "02:00:00:00:00:12"}],
        },
    ],
    "bgp": {"asn": 65001},
}


def test_parse_defaults_and_values() -> None:
    sync = parse_config(BASE, "t.yaml").lb.conntrack_sync
    assert sync is not None
    assert sync.interface == "v6lb-sync0"
    assert (sync.address, sync.peer) == (IPv6Address("fd00:99::1"), IPv6Address("fd00:99::2"))
    assert sync.port == 3780
    assert sync.peer_snat == (IPv6Address("2001:db8:5::2"),)
    assert parse_config({"lb": {"instance": "x"}}, "t.yaml").lb.conntrack_sync is None


def test_summary_line() -> None:
    text = summarize(parse_config(BASE, "t.yaml"))
    assert (
        "  conntrack sync: conntrackd FTFW over UDP [fd00:99::1]:3780 -> [fd00:99::2]:3780"
        " on v6lb-sync0; peer SNAT announced as standby: 2001:db8:5::2\n"
    ) in text


def _sync(**change: object) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["lb"]["conntrack_sync"].update(change)
    return data


@pytest.mark.parametrize(
    ("data", "path", "fix"),
    [
        (_sync(peer="fd00:99::1"), "lb.conntrack_sync.peer", "other instance's address"),
        (_sync(peer="192.0.2.1"), "lb.conntrack_sync.peer", "IPv6"),
        (_sync(peer="fe80::2"), "lb.conntrack_sync.peer", "unique-local"),
        (_sync(address="2001:db8:1::2"), "lb.conntrack_sync.address", "dedicated sync link"),
        (_sync(interface="up0"), "lb.conntrack_sync.interface", "its own link"),
        (_sync(interface="a b"), "lb.conntrack_sync.interface", "15 characters"),
        (_sync(port=0), "lb.conntrack_sync.port", ""),
        (_sync(peers=["fd00:99::2"]), "lb.conntrack_sync.peers", "did you mean `peer`"),
        (_sync(peer_snat=["2001:db8:5::1"]), "lb.conntrack_sync.peer_snat[0]", "other instance"),
        (
            _sync(peer_snat=["2001:db8:5::2", "2001:db8:5::2"]),
            "lb.conntrack_sync.peer_snat[1]",
            "once",
        ),
        ({**_sync(), "bgp": {"med": 1}}, "lb.conntrack_sync.peer_snat[0]", "add a bgp: section"),
        (
            {**_sync(), "vips": [BASE["vips"][1]]},
            "lb.conntrack_sync",
            "add a VIP with mode: nat",
        ),
    ],
)
def test_errors_name_the_field_and_a_fix(data: dict[str, Any], path: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "t.yaml")
    assert err.value.path == path, str(err.value)
    assert fix in err.value.fix, str(err.value)


def test_missing_fields() -> None:
    for key in ("interface", "address", "peer"):
        data = copy.deepcopy(BASE)
        del data["lb"]["conntrack_sync"][key]
        with pytest.raises(ConfigError) as err:
            parse_config(data, "t.yaml")
        assert err.value.path == f"lb.conntrack_sync.{key}" and "required" in err.value.message


def test_sync_addresses_are_the_nat_backends() -> None:
    config = parse_config(BASE, "t.yaml")
    assert [str(a) for a in sync_addresses(config)] == ["2001:db8:1::10", "2001:db8:1::11"]


def test_render_golden() -> None:
    text = render_conntrackd(parse_config(BASE, "t.yaml"), "/run/v6lb/lb1.sock.conntrackd/")
    if UPDATE:
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    # the counts that matter, read from the text itself
    assert text.count("IPv6_address ") == 3  # the UDP source, then the 2 nat backends
    assert "\tFilter From Userspace {\n" in text
    assert "\t\tIPv6_Destination_Address fd00:99::2\n" in text
    assert "\t\tHashLimit 200000\n" not in text and "\tHashLimit 200000\n" in text
    assert text.count("/run/v6lb/lb1.sock.conntrackd/") == 3  # log, lock, socket


def test_render_needs_the_option() -> None:
    data = copy.deepcopy(BASE)
    del data["lb"]["conntrack_sync"]
    with pytest.raises(ValueError, match="conntrack_sync is not set"):
        render_conntrackd(parse_config(data, "t.yaml"), "/tmp/x")


@pytest.mark.skipif(shutil.which("conntrackd") is None, reason="needs conntrackd")
@pytest.mark.skipif(os.geteuid() != 0, reason="conntrackd needs root (netlink)")
@pytest.mark.root
def test_conntrackd_accepts_the_rendered_file(tmp_path: Path) -> None:
    """conntrackd parses the file and stops at the socket (no such interface here)."""
    conf = tmp_path / "c.conf"
    conf.write_text(render_conntrackd(parse_config(BASE, "t.yaml"), str(tmp_path)))
    ns = f"v6lb-ctdr-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = subprocess.run(
            ["ip", "netns", "exec", ns, "conntrackd", "-C", str(conf)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    log = (tmp_path / "conntrackd.log").read_text()
    # the parser accepted every line; it fails later, binding to v6lb-sync0, which is missing
    assert r.returncode == 1 and "parse" not in log.lower(), log
    assert "can't open channel socket: No such device" in log, log


def test_python_dataplane_refuses_sync(tmp_path: Path) -> None:
    """conntrackd replicates the kernel's table: `run --dataplane python` refuses the option."""
    from v6lb.engines.daemon import RunOptions, prepare
    from v6lb.engines.plane import RunError

    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(RunError) as err:
        prepare(RunOptions(str(path), dataplane="python"))
    assert "lb.conntrack_sync needs --dataplane kernel" in err.value.message
    assert err.value.fix == "run it with --dataplane kernel, or remove lb.conntrack_sync"


def test_snat_addresses_announced_own_and_standby() -> None:
    """With conntrack_sync the speaker announces its SNAT, and the peer's with MED + 1000."""
    from ipaddress import IPv6Network

    from v6lb.engines.announce import STANDBY_MED_STEP, snat_routes
    from v6lb.render.bird import SpeakerRoute, render_speaker

    data = copy.deepcopy(BASE)
    data["bgp"] = {
        "asn": 65001,
        "med": 10,
        "neighbours": [{"name": "up", "address": "2001:db8:1::1", "asn": 65000}],
    }
    config = parse_config(data, "t.yaml")
    settings = config.bgp_speaker
    assert settings is not None
    routes = snat_routes(config, settings)
    assert routes == {
        IPv6Network("2001:db8:5::1/128"): None,  # its own: the speaker's MED
        IPv6Network("2001:db8:5::2/128"): 10 + STANDBY_MED_STEP,
    }
    text = render_speaker("lb1", settings, [SpeakerRoute(p, med=m) for p, m in routes.items()])
    assert "  if net = 2001:db8:5::1/128 then bgp_med = 10;\n" in text
    assert "  if net = 2001:db8:5::2/128 then bgp_med = 1010;\n" in text
    del data["lb"]["conntrack_sync"]
    assert snat_routes(parse_config(data, "t.yaml"), settings) == {}  # no sync: not announced
