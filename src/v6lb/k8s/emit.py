"""A derived config as YAML text, with a comment on each VIP naming where it came from.

Plain data only (dicts, lists, strings, numbers, booleans), as
:func:`v6lb.k8s.derive.derive_config` builds it: strings are written as JSON strings
(valid YAML double-quoted scalars), mappings and lists of scalars on one line. One pass,
no YAML library: 50,000 backends write in well under a second.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from v6lb.k8s.derive import Derived

__all__ = ["to_yaml"]


def _scalar(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if v is None:
        return "null"
    text = str(v)
    if text.replace("-", "").replace(".", "").replace("_", "").isalnum() and text[0].isalpha():
        if text.lower() not in ("true", "false", "yes", "no", "on", "off", "null", "default"):
            return text
        if text == "default":  # the route prefix keyword: a plain string either way
            return text
    return json.dumps(text)


def _flat(v: object) -> bool:
    if isinstance(v, Mapping):
        return all(not isinstance(x, Mapping | list) for x in v.values())
    if isinstance(v, list):
        return all(not isinstance(x, Mapping | list) for x in v)
    return True


def _inline(v: object) -> str:
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_scalar(k)}: {_scalar(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    return _scalar(v)


def _emit(v: object, indent: int, out: list[str]) -> None:
    pad = " " * indent
    if isinstance(v, Mapping):
        for k, x in v.items():
            if _flat(x):
                out.append(f"{pad}{_scalar(k)}: {_inline(x)}")
            else:
                out.append(f"{pad}{_scalar(k)}:")
                _emit(x, indent + 2, out)
    elif isinstance(v, list):
        for x in v:
            if _flat(x):
                out.append(f"{pad}- {_inline(x)}")
            else:
                sub: list[str] = []
                _emit(x, indent + 2, sub)
                out.append(f"{pad}- {sub[0].lstrip()}")
                out.extend(sub[1:])


def to_yaml(derived: Derived, sources: Sequence[str]) -> str:
    """The config file: a header, ``lb:``, the VIPs each with its origin, ``topology:``."""
    data = derived.data
    out = [
        f"# v6lb config derived by `v6lb k8s config` from {', '.join(sources)}.",
        "# Each VIP serves one port of a LoadBalancer Service or one backend of an ALB",
        "# Ingress, in the mode that keeps what the AWS load balancer gave the pod (the",
        "# comment says which object, and why that mode). The topology models the cluster:",
        "# client -- igw -- lb (public) -- nodes (private) -- pods at their real addresses.",
        "# Check it with `v6lb check FILE`; run it with `v6lb lab up FILE`.",
    ]
    for n in derived.notes:
        out.append(f"# note: {n}")
    out.append("")
    _emit({"lb": data["lb"]}, 0, out)
    out.append("")
    out.append("vips:")
    vips = data["vips"]
    assert isinstance(vips, list)
    for vip in vips:
        out.append(f"  # {derived.comments.get(vip['name'], '')}")
        _emit([vip], 2, out)
    out.append("")
    _emit({"topology": data["topology"]}, 0, out)
    return "\n".join(out) + "\n"
