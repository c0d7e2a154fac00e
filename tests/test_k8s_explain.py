"""`v6lb k8s explain`: the AWS load balancer's answers, and the v6lb mode run in the simulator.

The manifests are tests/data/k8s/ (kubectl-style Lists and hand-written documents) and
tests/data/k8s/aws/ (the controller's examples). Each exposed port is explained twice: as
AWS documents it (v6lb.k8s.aws, every rule with its source) and by packets, in the
simulator, on a topology made from the manifests; the two must agree on what the pod sees
and on the reply's way.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from v6lb.cli import main

DATA = Path(__file__).resolve().parent / "data" / "k8s"
CLIENT = "2001:db8:ffff::100"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["k8s", "explain", *args])
    out, err = capsys.readouterr()
    return code, out, err


def explain_json(capsys: pytest.CaptureFixture[str], *files: str) -> dict[str, Any]:
    code, out, err = run(capsys, *files, "--json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def test_every_exposed_port_aws_and_simulator_agree(capsys: pytest.CaptureFixture[str]) -> None:
    d = explain_json(capsys, str(DATA / "echo-cluster.yaml"))
    got = {x["vip"]: x for x in d["exposed"]}
    assert len(got) == 4
    for x in got.values():
        aws, sim = x["aws"], x["simulated"]
        assert x["mode"] == aws["v6lb_mode"], x["vip"]  # the mode keeps what AWS gives
        assert sim["mode"] == x["mode"] and len(sim["hops"]) >= 10  # real packets
        assert sim["answers"]["reply_via_lb"] == aws["answers"]["reply_via_lb"] is True
        assert all(r["source"]["url"] or r["source"]["quote"] for r in aws["rules"])
        seen = sim["answers"]["backend_saw_source"]
        if "client" in aws["answers"]["pod_saw_source"]:  # client IP preservation
            assert x["mode"] == "nat" and seen == CLIENT, x["vip"]
        else:  # the pod sees the load balancer's address, the simulated LB's here
            assert x["mode"].startswith("proxy") and seen == "fd00:10::a", x["vip"]
    alb = next(x for x in got.values() if x["aws"]["load_balancer"] == "alb")
    assert (
        alb["mode"] == "proxy-l7"
        and "X-Forwarded-For" in (alb["aws"]["answers"]["client_address_reaches_app"])
    )
    # the one terminating-but-serving endpoint of the cluster is a pitfall, with its fix
    codes = [p["code"] for p in d["other_pitfalls"]]
    assert codes == ["terminating-serving"] and d["other_pitfalls"][0]["fix"]


def test_text_has_the_settings_the_answers_and_the_hop_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, str(DATA / "aws" / "game-2048-nlb-ip.yaml"))
    assert code == 0
    assert "AWS: NLB (aws-load-balancer-controller), ip targets" in out
    assert "preserve client IP" in out and "https://" in out  # a setting and its source
    assert "What source did the pod see?" in out and "client IP preservation" in out
    assert "v6lb models it with nat" in out
    assert "What source address did the backend see?" in out and CLIENT in out  # simulated
    assert "│ handshake │" in out  # the hop table


def test_stdin_and_pitfalls_without_endpoints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (DATA / "aws" / "pitfalls" / "instance-ipv6.yaml").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text)))
    d = explain_json(capsys, "-")
    (x,) = d["exposed"]
    assert x["simulated"] is None and x["vip"] is None  # no ready endpoint: not simulated
    assert x["aws"]["target_type"] == "instance"
    assert [p["code"] for p in x["pitfalls"]] == ["instance-ipv6"]
    assert x["pitfalls"][0]["object"] in x["object"] and x["pitfalls"][0]["fix"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("kind: [Service\n", ["bad.yaml", "not YAML"]),
        ("just: a mapping\n", ["bad.yaml", "not a Kubernetes object"]),
        ("apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n", ["metadata.name"]),
    ],
    ids=["not-yaml", "not-kubernetes", "no-name"],
)
def test_bad_input_exits_2_with_the_object(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, words: list[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    code, out, err = run(capsys, str(bad))
    assert code == 2 and out == "" and "Traceback" not in err
    assert all(w in err for w in words), err


def test_only_names_what_there_is(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--only", "nope/nothing", str(DATA / "echo-cluster.yaml"))
    assert code == 2 and out == "" and "--only nope/nothing" in err and "web/echo-nlb" in err
    d = explain_json(capsys, "--only", "web/echo-nlb", str(DATA / "echo-cluster.yaml"))
    assert [x["object"].split()[1] for x in d["exposed"]] == ["web/echo-nlb"]


def test_a_refused_annotation_names_the_object_and_the_annotation(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = (DATA / "aws" / "game-2048-nlb-ip.yaml").read_text()
    key = "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type"
    assert f"{key}: ip" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(f"{key}: ip", f"{key}: pod"))
    code, out, err = run(capsys, str(bad))
    assert code == 2 and out == ""
    assert "Service game-2048/service-2048" in err and key in err and "fix:" in err, err
