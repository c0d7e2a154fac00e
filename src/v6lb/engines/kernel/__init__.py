"""The kernel data plane: apply what :mod:`v6lb.render` produced, atomically, and remove it."""

from v6lb.engines.kernel.apply import (
    ApplyError,
    KernelError,
    MissingFeatureError,
    MissingToolError,
    NotRootError,
    Rendered,
    apply,
    apply_ip6tables,
    apply_nft,
    apply_routes,
    nft_counters,
    nft_tables,
    remove,
    render_lb,
    require_root,
    require_tools,
)

__all__ = [
    "ApplyError",
    "KernelError",
    "MissingFeatureError",
    "MissingToolError",
    "NotRootError",
    "Rendered",
    "apply",
    "apply_ip6tables",
    "apply_nft",
    "apply_routes",
    "nft_counters",
    "nft_tables",
    "remove",
    "render_lb",
    "require_root",
    "require_tools",
]
