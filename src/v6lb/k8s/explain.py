"""`v6lb k8s explain`'s plan: each exposed port, what the AWS LB does, and a one-VIP config.

Pure: the manifests and the derived config (:func:`v6lb.k8s.derive.derive_config`) in;
for each VIP, the AWS load balancer in front of it (:mod:`v6lb.k8s.aws`, every rule with
its source), the pitfalls of its objects (:mod:`v6lb.k8s.pitfalls`), and a config that
holds that VIP alone on the derived topology, for the CLI to run in the simulator (the
VIP's mode keeps what the AWS load balancer gives the pod: docs/kubernetes.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from v6lb.k8s.aws import AwsLb, aws_lb_for_ingress, aws_lb_for_service
from v6lb.k8s.derive import Derived, exposed
from v6lb.k8s.manifests import Manifests
from v6lb.k8s.pitfalls import Pitfall, pitfalls

__all__ = ["Exposure", "Plan", "aws_answers", "plan_dict", "plan_explain"]


@dataclass(frozen=True, slots=True)
class Exposure:
    """One exposed port: what it serves, the AWS LB, the pitfalls, and (when it has ready
    IPv6 endpoints) its VIP of the derived config, alone on the derived topology."""

    origin: str  # "Service ns/name spec.ports[0]" or "Ingress ns/name spec.rules[0]..."
    aws: AwsLb | None  # None: not an AWS load balancer (another class or controller)
    pitfalls: tuple[Pitfall, ...]
    vip: str | None = None  # None: not simulated (no ready IPv6 endpoint)
    address: str | None = None
    mode: str | None = None
    comment: str = ""  # the derived config's comment: the ports and why this mode
    data: dict[str, object] | None = None  # the derived config with this VIP alone


@dataclass(frozen=True, slots=True)
class Plan:
    exposures: list[Exposure]
    other_pitfalls: list[Pitfall]  # those of objects no exposure names


def plan_explain(m: Manifests, derived: Derived, only: Sequence[str] = ()) -> Plan:
    """An :class:`Exposure` per exposed port of ``m``; ``only``: the ``namespace/name`` of
    the Services or Ingresses to keep (every one when empty). ``derived``: the config of
    ``m`` (:func:`~v6lb.k8s.derive.derive_config`, ``allow_empty=True``)."""
    found = pitfalls(m.objects)  # with AwsLb.warnings (code "aws") not said by another code
    named: set[str] = set()
    vips = derived.data.get("vips", [])
    assert isinstance(vips, list)
    by_name = {str(v["name"]): v for v in vips}
    vip_of = {(e.source, e.where): name for name, e in derived.origins.items()}
    out: list[Exposure] = []
    for e in exposed(m, []):
        if only and not {e.source.key, e.service.ref.key} & set(only):
            continue
        if e.ingress is not None:
            lb = aws_lb_for_ingress(m.raw(e.ingress.ref), backend=m.raw(e.service.ref))
        else:
            lb = aws_lb_for_service(m.raw(e.service.ref))
        mine = {f"{r.kind} {r.key}" for r in (e.source, e.service.ref)}
        named |= mine
        base = Exposure(
            f"{e.source.kind} {e.source.key} {e.where}",
            lb,
            tuple(p for p in found if p.obj in mine),
        )
        name = vip_of.get((e.source, e.where))
        if name is None:
            out.append(base)
            continue
        vip = by_name[name]
        data = {k: v for k, v in derived.data.items() if k != "vips"}
        data["vips"] = [vip]
        out.append(
            replace(
                base,
                vip=name,
                address=str(vip["address"]),
                mode=str(vip["mode"]),
                comment=derived.comments.get(name, ""),
                data=data,
            )
        )
    rest = [] if only else [p for p in found if p.obj not in named]
    return Plan(out, rest)


def plan_dict(plan: Plan, simulated: Sequence[Mapping[str, object] | None]) -> dict[str, object]:
    """``v6lb k8s explain --json``: ``simulated`` is each exposure's explanation, or None."""
    return {
        "exposed": [exposure_dict(e, x) for e, x in zip(plan.exposures, simulated, strict=True)],
        "other_pitfalls": [pitfall_dict(p) for p in plan.other_pitfalls],
    }


def exposure_dict(e: Exposure, simulated: Mapping[str, object] | None) -> dict[str, object]:
    """One exposure's entry (``simulated``: its explanation)."""
    return {
        "object": e.origin,
        "vip": e.vip,
        "address": e.address,
        "mode": e.mode,
        "why": e.comment,
        "aws": aws_answers(e.aws) if e.aws is not None else None,
        "simulated": simulated,
        "pitfalls": [pitfall_dict(p) for p in e.pitfalls],
    }


def pitfall_dict(p: Pitfall) -> dict[str, str]:
    return {
        "code": p.code,
        "object": p.obj,
        "field": p.field,
        "reason": p.reason,
        "fix": p.fix,
        "source": p.source.url,
    }


def aws_answers(lb: AwsLb) -> dict[str, Any]:
    """The five answers of `v6lb explain`, as the AWS documentation gives them for ``lb``,
    with the settings that decide them and the sources."""
    p = lb.ipv6_client
    return {
        "load_balancer": lb.kind.value,
        "controller": lb.controller.value,
        "target_type": lb.target_type,
        "scheme": lb.scheme,
        "ip_address_type": lb.ip_address_type,
        "target_family": lb.target_family,
        "proxy_protocol_v2": lb.proxy_protocol_v2,
        "preserve_client_ip": lb.preserve_client_ip,
        "deregistration_delay_s": lb.deregistration_delay_s,
        "reachable_over_ipv6": p.reachable,
        "answers": {
            "nat66_at_lb": p.nat66_at_lb,
            "nat_kind": p.nat_kind,
            "pod_saw_source": p.pod_sees_source,
            "reply_via_lb": p.reply_via_lb,
            "lb_state": p.lb_state,
            "client_address_reaches_app": p.client_address_reaches_app,
        },
        "v6lb_mode": p.v6lb_mode,
        "notes": list(p.notes),
        "rules": [
            {"setting": r.setting, "value": r.value, "origin": r.origin, "source": _src(r.source)}
            for r in lb.rules
        ],
        "sources": [_src(s) for s in p.sources],
        "warnings": [str(w) for w in lb.warnings],
    }


def _src(s: Any) -> Mapping[str, str]:
    return {"url": s.url, "quote": s.quote}
