# v6lb: `make demo` and `make test` do all the set-up on a fresh Debian 12 machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_STAMP := .venv/.apt-installed
# Debian packages the tests use: tshark reads the pcaps we write; chromium renders the
# HTML report headless; iproute2/nftables/iptables for the lab and the kernel-hash check;
# systemd for `systemd-analyze verify` of contrib/systemd/v6lb@.service; prometheus scrapes
# v6lb in the metrics test; clang, llvm, libbpf-dev and bpftool build and load the XDP program;
# nghttp2-client gives h2load to benchmarks/bench_h2.py; ethtool reads veth XDP counters.
APT_PACKAGES := tshark iproute2 nftables iptables chromium curl tcpdump bird2 haproxy nginx-light wrk nghttp2-client iperf3 conntrackd conntrack systemd prometheus clang llvm libbpf-dev bpftool ethtool

.PHONY: demo test lint typecheck pytest bench clean deps apt install-unit xdp

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

deps: $(STAMP)

# Install the Debian packages the tests need, when we can (root) and they are missing.
$(APT_STAMP): $(STAMP)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing || \
	     (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing)) >/dev/null; \
	  else echo "not root: skipping apt-get install of$$missing (tests needing them will say so)"; fi; \
	fi
	touch $(APT_STAMP)

apt: $(APT_STAMP)

# The XDP program (docs/dataplane-xdp.md): BPF C compiled by Debian's clang into build/,
# which git ignores; never commit the object. Rebuilt only when a source changes.
XDP_SRC := src/v6lb/engines/xdp
# bench.c is the benchmark's build of the same code (benchmarks/bench_xdp.py); pass.c
# the XDP_PASS program for a veth peer; sockmap_relay.c proxy-l4's kernel relay
# (docs/proxy.md, "Kernel relay"). build/xdp/v6lb_xdp_<name>.o comes from <name>.c.
XDP_OBJ := build/xdp/v6lb_xdp.o
XDP_BENCH_OBJ := build/xdp/v6lb_xdp_bench.o
XDP_PASS_OBJ := build/xdp/v6lb_xdp_pass.o
RELAY_OBJ := build/xdp/v6lb_xdp_sockmap_relay.o
CLANG ?= clang
XDP_APT := clang llvm libbpf-dev bpftool
build/xdp/%.o: $(wildcard $(XDP_SRC)/*.c $(XDP_SRC)/*.h) | $(APT_STAMP)
	@if ! command -v $(CLANG) >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing the BPF toolchain: $(XDP_APT)"; \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(XDP_APT) || \
	     (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(XDP_APT))) >/dev/null; \
	  else echo "not root and no $(CLANG): $@ not built (apt-get install $(XDP_APT))"; fi; \
	fi
	@if command -v $(CLANG) >/dev/null; then mkdir -p $(dir $@) && set -x && \
	  $(CLANG) -O2 -g -Wall -Werror -target bpf -I/usr/include/$$(uname -m)-linux-gnu \
	    -c $(XDP_SRC)/$(patsubst v6lb_xdp_%,%,$*).c -o $@; fi

xdp: $(XDP_OBJ) $(XDP_BENCH_OBJ) $(XDP_PASS_OBJ) $(RELAY_OBJ)

demo: $(STAMP)
	$(VENV)/bin/v6lb demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy src

# Two workers (the CI machine has 2 cores); --dist loadfile keeps each test file, and so
# its module-scoped namespaces and fixtures, in one worker.
PYTEST_WORKERS ?= 2
pytest: $(STAMP) $(APT_STAMP) $(XDP_OBJ) $(XDP_BENCH_OBJ) $(XDP_PASS_OBJ) $(RELAY_OBJ)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(STAMP) $(XDP_OBJ) $(XDP_BENCH_OBJ) $(RELAY_OBJ)
	$(PY) benchmarks/run_all.py

# The systemd unit (docs/operations.md, "Service unit"): v6lb@NAME.service runs
# /etc/v6lb/NAME.yaml with /usr/local/bin/v6lb, linked to this checkout's v6lb.
# DESTDIR=DIR installs under DIR instead (and skips systemctl daemon-reload).
UNITDIR ?= /etc/systemd/system
BINDIR ?= /usr/local/bin
V6LB_BIN ?= $(CURDIR)/$(VENV)/bin/v6lb
install-unit:
	@test -x $(V6LB_BIN) || { echo "$(V6LB_BIN) is missing: run make deps first (or give V6LB_BIN=PATH)"; exit 2; }
	install -D -m 0644 contrib/systemd/v6lb@.service $(DESTDIR)$(UNITDIR)/v6lb@.service
	install -d -m 0755 $(DESTDIR)/etc/v6lb $(DESTDIR)$(BINDIR)
	ln -sfn $(V6LB_BIN) $(DESTDIR)$(BINDIR)/v6lb
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
