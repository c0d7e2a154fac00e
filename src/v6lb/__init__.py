"""v6lb: an IPv6 load balancer and network lab.

Modes: proxy-l4, proxy-l7, npt, nat, dsr-l2, dsr-ip6ip6, dsr-srv6 (and anycast,
a property of how VIPs are announced). See docs/architecture.md.
"""

from v6lb.model.modes import NAMES as MODES  # the mode table's names, in that order

__version__ = "0.1.0"

__all__ = ["MODES", "__version__"]
