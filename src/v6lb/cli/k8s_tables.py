"""`v6lb k8s explain`'s terminal output: per exposed port, the AWS load balancer (each
setting, what decides it, its source), the five answers as AWS documents them, then the
v6lb mode's hop table and answers from the simulator, and the pitfalls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from v6lb.k8s.explain import Exposure
    from v6lb.k8s.pitfalls import Pitfall
    from v6lb.model.explain import Explanation

__all__ = ["print_k8s_explain"]


def print_k8s_explain(
    runs: Sequence[tuple[Exposure, Explanation | None]],
    other: Sequence[Pitfall],
    *,
    compact: bool,
) -> None:
    from rich.rule import Rule
    from rich.table import Table
    from rich.text import Text

    from v6lb.cli.common import wide_console
    from v6lb.cli.tables import print_explanation
    from v6lb.k8s.explain import aws_answers

    console = wide_console()
    for e, exp in runs:
        title = e.origin + (f": VIP {e.vip} [{e.address}]" if e.vip else "")
        console.print(Rule(title))
        if e.aws is None:
            console.print(Text("Not an AWS load balancer (another class or controller)."))
        else:
            a = aws_answers(e.aws)
            console.print(
                Text(
                    f"AWS: {a['load_balancer'].upper()} ({a['controller']}), {a['target_type']}"
                    f" targets, {a['scheme']}, {a['ip_address_type']}, target group"
                    f" {a['target_family']}; client IP preservation"
                    f" {'on' if a['preserve_client_ip'] else 'off'}, PROXY v2"
                    f" {'on' if a['proxy_protocol_v2'] else 'off'}",
                    style="bold",
                )
            )
            t = Table(show_header=True, header_style="bold", expand=False)
            for col in ("setting", "value", "decided by", "source"):
                t.add_column(col)
            for r in a["rules"]:
                t.add_row(r["setting"], r["value"], r["origin"], r["source"]["url"] or "none found")
            console.print(t)
            ans = a["answers"]
            console.print(Text("What the AWS load balancer does with an IPv6 client's packet:"))
            rows = [
                ("Reachable over IPv6?", "yes" if a["reachable_over_ipv6"] else "no"),
                ("Did NAT66 happen at the LB?",
                 ("yes: " if ans["nat66_at_lb"] else "no: ") + ans["nat_kind"]),
                ("What source did the pod see?", ans["pod_saw_source"]),
                ("Does the reply go back through the LB?", "yes" if ans["reply_via_lb"] else "no"),
                ("What state does the LB hold per flow?", ans["lb_state"]),
                ("How does the client's address reach the app?", ans["client_address_reaches_app"]),
            ]  # fmt: skip
            for q, v in rows:
                console.print(Text(f"  {q:<46} {v}"))
            for n in a["notes"]:
                console.print(Text(f"  note: {n}"))
        if exp is None:
            console.print(
                Text("Not run in the simulator: no ready IPv6 endpoint (see the warnings).")
            )
        else:
            why = e.comment.rpartition("; ")[2]
            console.print(Text(f"v6lb models it with {e.mode} ({why}):", style="bold"))
            print_explanation(console, exp, max_rows=10_000, compact=compact)
        for p in e.pitfalls:
            console.print(Text(f"warning: {p}", style="yellow"))
        console.print()
    for p in other:
        console.print(Text(f"warning: {p}", style="yellow"))
