"""The XDP data plane's foundation: a BPF C program for the DSR modes and npt, its harness.

``v6lb_xdp.c`` (with ``parse.h``, ``hash.h``, ``encap.h``, ``l2.h``, ``npt.h``, ``icmp.h``,
``ptb.h``, ``maps.h``, ``counters.h``)
is compiled by ``make xdp`` into ``build/xdp/v6lb_xdp.o``. :mod:`.bpf` wraps the bpf(2)
syscall; :mod:`.program` loads the object with bpftool, pins it under a tagged bpffs
directory and fills its maps from a config. ``v6lb run`` does not offer this plane
today (docs/dataplane-xdp.md).
"""
