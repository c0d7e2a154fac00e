"""The ``bgp:`` speaker settings (model/bgp) and the bird.conf renderer (render/bird).

No root: YAML in, settings or text out. ``V6LB_UPDATE_GOLDEN=1 pytest
tests/test_bird_render.py`` rewrites tests/golden/bird_*.conf (review the
diff). tests/test_bird_lab.py runs the same renderer's output in namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from v6lb.engines.bird import BirdMissingError, parse_protocols, require_bird
from v6lb.model.bgp import BfdSettings, BgpSettings, Neighbour, router_id_for
from v6lb.model.config import ConfigError, parse_config
from v6lb.render.bird import SpeakerRoute, render_router, render_speaker, static_name

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("V6LB_UPDATE_GOLDEN") == "1"

BGP: dict[str, Any] = {
    "asn": 65001,
    "router_id": "192.0.2.11",
    "hold": 3,
    "keepalive": 1,
    "bfd": {"interval": 0.1, "multiplier": 3},
    "med": 10,
    "neighbours": [
        {"name": "upstream", "address": "2001:db8:fffe:a::1", "asn": 65000, "interface": "up0"}
    ],
    "announcements": [{"prefix": "2001:db8:a:1a0::/64", "site": "primary", "cost": 10}],
}


# the VIP that BGP["announcements"] holds: an announcement must hold a VIP address
VIPS: list[dict[str, Any]] = [
    {
        "name": "web",
        "address": "2001:db8:a:1a0::1",
        "ports": [80],
        "mode": "nat",
        "backends": [{"address": "fd00:10::a"}],
    }
]


def settings(bgp: dict[str, Any]) -> BgpSettings | None:
    return parse_config({"bgp": bgp, "vips": VIPS}, "t.yaml").bgp_speaker


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs; V6LB_UPDATE_GOLDEN=1 rewrites it"


def speaker_text() -> str:
    s = settings(BGP)
    assert s is not None
    return render_speaker(
        "lb-a1",
        s,
        [
            SpeakerRoute(IPv6Network("2001:db8:a:1a0::/64")),
            SpeakerRoute(IPv6Network("2001:db8:a:1a1::80/128"), med=50, up=False),
        ],
    )


def router_text() -> str:
    s = settings(
        {
            "asn": 65000,
            "router_id": "192.0.2.1",
            "neighbours": [
                {
                    "name": "lb_a1",
                    "address": "2001:db8:fffe:a::2",
                    "asn": 65001,
                    "interface": "r1",
                    "local_pref": 200,
                },
                {
                    "name": "lb_a2",
                    "address": "2001:db8:fffe:a::3",
                    "asn": 65001,
                    "interface": "r1",
                    "local_pref": 200,
                },
                {"name": "lb_b1", "address": "2001:db8:fffe:b::2", "asn": 65001, "interface": "r2"},
            ],
        }
    )
    assert s is not None
    return render_router("isp", s)


def site_router_text() -> str:
    s = settings(
        {
            "asn": 65010,
            "router_id": "192.0.2.2",
            "neighbours": [
                {"name": "lb_a1", "address": "2001:db8:1::2", "asn": 65001, "interface": "site"},
                {"name": "lb_a2", "address": "2001:db8:1::3", "asn": 65001, "interface": "site"},
                {"name": "upstream", "address": "2001:db8:fa::1", "asn": 65000, "interface": "up"},
            ],
        }
    )
    assert s is not None
    return render_router("r-a", s, uplinks=["upstream"], uplink_med=10)


def test_site_router_golden() -> None:
    text = site_router_text()
    golden("bird_site_router.conf", text)
    # the LBs' routes go upstream with the site's MED; nothing is learnt from upstream
    assert "export filter v6lb_uplink;" in text and "bgp_med = 10;" in text
    assert text.count("import all;") == 2 and text.count("import none;") == 2  # + kernel


def test_site_router_unknown_uplink() -> None:
    s = settings({"asn": 65010, "neighbours": [{"address": "2001:db8:1::2", "asn": 65001}]})
    assert s is not None
    with pytest.raises(ValueError, match="uplink 'upstream' is not a neighbour"):
        render_router("r-a", s, uplinks=["upstream"])


def test_announcement_must_hold_a_vip() -> None:
    bad = dict(BGP, announcements=[{"prefix": "2001:db8:e::/64", "site": "a", "cost": 1}])
    with pytest.raises(ConfigError) as exc:
        settings(bad)
    text = str(exc.value)
    assert "bgp.announcements[0].prefix" in text and "holds no VIP address" in text, text
    assert "web 2001:db8:a:1a0::1" in text, text  # the fix lists the VIPs
    # the same with only announcements (the simulator's form, no speaker)
    with pytest.raises(ConfigError, match="holds no VIP address"):
        settings({"announcements": bad["announcements"]})


def test_speaker_golden() -> None:
    golden("bird_speaker.conf", speaker_text())


def test_router_golden() -> None:
    golden("bird_router.conf", router_text())


@pytest.mark.tool
@pytest.mark.skipif(shutil.which("bird") is None, reason="needs bird2 (apt-get install bird2)")
def test_bird_accepts_rendered(tmp_path: Path) -> None:
    for name, text in (
        ("s.conf", speaker_text()),
        ("r.conf", router_text()),
        ("sr.conf", site_router_text()),
    ):
        (tmp_path / name).write_text(text)
        r = subprocess.run(
            ["bird", "-p", "-c", str(tmp_path / name)], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr


def test_parse_defaults_and_values() -> None:
    s = settings({"asn": 65001, "neighbours": [{"address": "fd00:1::1", "asn": 65000}]})
    assert s == BgpSettings(
        65001,
        None,
        3,
        1,
        BfdSettings(True, 0.1, 3),
        None,
        (Neighbour("peer0", IPv6Address("fd00:1::1"), 65000),),
    )
    assert s.bfd.detection_time == pytest.approx(0.3)
    full = settings(BGP)
    assert full is not None and full.med == 10 and full.neighbours[0].interface == "up0"
    assert settings({**BGP, "bfd": False}).bfd.enabled is False  # type: ignore[union-attr]
    assert settings({**BGP, "router_id": 3221225995}).router_id == "192.0.2.11"  # type: ignore[union-attr]


def test_announcements_only_has_no_speaker() -> None:
    assert settings({"announcements": BGP["announcements"]}) is None
    assert parse_config({}, "t.yaml").bgp_speaker is None


@pytest.mark.parametrize(
    ("patch", "path", "fix"),
    [
        ({"asn": 0}, "bgp.asn", "AS number"),
        ({"asn": 23456}, "bgp.asn", "private AS"),
        ({"hold": 2}, "bgp.hold", "hold: 3"),
        ({"hold": 3, "keepalive": 2}, "bgp.keepalive", "keepalive: 1"),
        ({"bfd": {"interval": 0.001}}, "bgp.bfd.interval", "0.01"),
        ({"bfd": {"multiplier": 0}}, "bgp.bfd.multiplier", "1 to 255"),
        ({"bfd": {"intervall": 0.1}}, "bgp.bfd.intervall", "interval"),
        ({"router_id": "2001:db8::1"}, "bgp.router_id", "dotted quad"),
        ({"router_id": "0.0.0.0"}, "bgp.router_id", "dotted quad"),
        ({"med": -1}, "bgp.med", "MED"),
        ({"neighbors": []}, "bgp.neighbors", "neighbours"),
        (
            {"neighbours": [{"address": "fe80::1", "asn": 65000}]},
            "bgp.neighbours[0].address",
            "unicast",
        ),
        ({"neighbours": [{"address": "2001:db8::1"}]}, "bgp.neighbours[0].asn", "asn: 65000"),
        (
            {"neighbours": [{"address": "2001:db8::1", "asn": 65000, "name": "a-b"}]},
            "bgp.neighbours[0].name",
            "letters",
        ),
        (
            {"neighbours": [{"address": "2001:db8::1", "asn": 65000, "interface": "x" * 16}]},
            "bgp.neighbours[0].interface",
            "15 characters",
        ),
        (
            {
                "neighbours": [
                    {"address": "2001:db8::1", "asn": 65000},
                    {"address": "2001:db8::1", "asn": 65002},
                ]
            },
            "bgp.neighbours[1].address",
            "once",
        ),
    ],
)
def test_rejected(patch: dict[str, Any], path: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings({**BGP, **patch})
    assert err.value.file == "t.yaml"
    assert err.value.path == path
    assert fix in err.value.fix


def test_timers_without_asn_rejected() -> None:
    with pytest.raises(ConfigError) as err:
        settings({"hold": 9, "announcements": []})
    assert err.value.path == "bgp.asn" and "asn: 65001" in err.value.fix


def test_static_name_and_router_id() -> None:
    assert static_name(IPv6Network("2001:db8::1/128")) == "v6lb_2001_db8__1_128"
    assert static_name(IPv6Network("2001:db8::/64")) != static_name(IPv6Network("2001:db8::/48"))
    assert router_id_for("lb-a1") == router_id_for("lb-a1") != "0.0.0.0"


def test_parse_protocols() -> None:
    text = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     12:00:01.123
bfd1       BFD        ---        up     12:00:01.123
v6lb_2001_db8_a__1_128 Static     master6    down   12:00:03.456
upstream   BGP        ---        up     12:00:02.789  Established
lb2        BGP        ---        start  12:00:02.789  Active        Socket: Connection refused
"""
    p = parse_protocols(text)
    assert p["upstream"].established and p["upstream"].proto == "BGP"
    assert not p["lb2"].established and p["lb2"].info.startswith("Active")
    assert p["v6lb_2001_db8_a__1_128"].state == "down"


def test_missing_bird_names_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BirdMissingError, match="apt-get install bird2"):
        require_bird()


def test_npt_outside_prefix_announced_while_the_own_check_passes(tmp_path: Path) -> None:
    """An npt pair's outside prefix has no backends: it follows the LB's own check alone."""
    from v6lb.engines.announce import Announcer, npt_prefixes

    data: dict[str, Any] = {
        "lb": {"instance": "lb1", "addresses": ["2001:db8:1::2"]},
        "vips": [
            {
                "name": "web",
                "address": "2001:db8:f::80",
                "ports": [80],
                "mode": "dsr-srv6",
                "backends": [{"address": "2001:db8:1::10", "sid": "fd00:51::100"}],
            }
        ],
        "npt": [
            {"inside": "fd00:70::/48", "outside": "2001:db8:70::/48"},
            {"inside": "fd00:71::/48", "outside": "2001:db8:71::/48"},
        ],
        "bgp": {k: v for k, v in BGP.items() if k != "announcements"},
    }
    config = parse_config(data, "t.yaml")
    settings = config.bgp_speaker
    assert settings is not None
    outside = [IPv6Network("2001:db8:70::/48"), IPv6Network("2001:db8:71::/48")]
    assert npt_prefixes(config) == outside
    a = Announcer(config, settings, "lb1", tmp_path, lambda _: None)
    vip = IPv6Network("2001:db8:f::80/128")
    assert list(a.announced) == [vip, *outside]
    want = a._wanted({})  # no pool with an eligible backend: the VIP stays withdrawn
    assert want == {vip: False, outside[0]: True, outside[1]: True}
    text = a._render(want)
    for prefix in outside:  # one static per prefix, enabled, with the speaker's MED
        block = text.split(f"protocol static {static_name(prefix)} {{")[1].split("}\n")[0]
        assert "disabled yes" not in block and f"route {prefix} blackhole;" in block, block
        assert f"  if net = {prefix} then bgp_med = 10;\n" in text
    assert "disabled yes" in text.split(f"protocol static {static_name(vip)} {{")[1]
    a.self_problem = "nft table ip6 v6lb_lb1 is gone"
    assert not any(a._wanted({}).values())  # the own check fails: nothing announced
    a.self_problem, a.leaving = None, True
    assert not any(a._wanted({}).values())  # a graceful stop withdrew everything
    del data["bgp"]
    assert Announcer.create(parse_config(data, "t.yaml"), "lb1", print) is None
