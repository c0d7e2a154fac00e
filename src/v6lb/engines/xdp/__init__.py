"""The XDP data plane: a BPF C program for the DSR modes and npt, its harness, its plane.

``v6lb_xdp.c`` (with ``parse.h``, ``hash.h``, ``encap.h``, ``l2.h``, ``npt.h``, ``icmp.h``,
``ptb.h``, ``maps.h``, ``counters.h``) is compiled by ``make xdp`` into
``build/xdp/v6lb_xdp.o`` (and ``pass.c``, the XDP_PASS program for a veth's peer).
:mod:`.bpf` wraps the bpf(2) syscall; :mod:`.program` loads the object with bpftool, pins
it under a tagged bpffs directory and fills its maps from a config; :mod:`.run` is
``v6lb run --dataplane xdp`` (docs/dataplane-xdp.md).
"""
