"""v6lb.core.flowhash: Linux jhash and the nftables flow keys, bit for bit.

Three independent checks: a plain transcription of the algorithm below, a C
program compiled at test time (both written from the algorithm description of
include/linux/jhash.h), and golden values derived from that C program, plus
the two values that lookup3.c's own self-test prints. Then, as root, the
kernel itself: nft's ``jhash`` marks in a private network namespace.
"""

from __future__ import annotations

import ipaddress
import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from v6lb.core.flowhash import (
    JHASH_INITVAL,
    flow_hash,
    flow_hash2,
    flow_hash3,
    flow_hash_packet,
    flow_index,
    flow_key,
    flow_key2,
    flow_key3,
    jhash,
    reciprocal_scale,
)

M32 = 0xFFFFFFFF


def addr(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


# --- an independent, deliberately literal Python transcription ----------------


def rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & M32


def jhash_literal(key: bytes, initval: int) -> int:
    length = len(key)
    a = b = c = (0xDEADBEEF + length + initval) & M32
    k = 0
    while length > 12:
        a = (a + (key[k] | key[k + 1] << 8 | key[k + 2] << 16 | key[k + 3] << 24)) & M32
        b = (b + (key[k + 4] | key[k + 5] << 8 | key[k + 6] << 16 | key[k + 7] << 24)) & M32
        c = (c + (key[k + 8] | key[k + 9] << 8 | key[k + 10] << 16 | key[k + 11] << 24)) & M32
        a = (a - c) & M32
        a ^= rol(c, 4)
        c = (c + b) & M32
        b = (b - a) & M32
        b ^= rol(a, 6)
        a = (a + c) & M32
        c = (c - b) & M32
        c ^= rol(b, 8)
        b = (b + a) & M32
        a = (a - c) & M32
        a ^= rol(c, 16)
        c = (c + b) & M32
        b = (b - a) & M32
        b ^= rol(a, 19)
        a = (a + c) & M32
        c = (c - b) & M32
        c ^= rol(b, 4)
        b = (b + a) & M32
        length -= 12
        k += 12
    if length == 0:
        return c
    # the kernel's fall-through switch, case by case
    if length >= 12:
        c += key[k + 11] << 24
    if length >= 11:
        c += key[k + 10] << 16
    if length >= 10:
        c += key[k + 9] << 8
    if length >= 9:
        c += key[k + 8]
    if length >= 8:
        b += key[k + 7] << 24
    if length >= 7:
        b += key[k + 6] << 16
    if length >= 6:
        b += key[k + 5] << 8
    if length >= 5:
        b += key[k + 4]
    if length >= 4:
        a += key[k + 3] << 24
    if length >= 3:
        a += key[k + 2] << 16
    if length >= 2:
        a += key[k + 1] << 8
    a = (a + key[k]) & M32
    b &= M32
    c &= M32
    c ^= b
    c = (c - rol(b, 14)) & M32
    a ^= c
    a = (a - rol(c, 11)) & M32
    b ^= a
    b = (b - rol(a, 25)) & M32
    c ^= b
    c = (c - rol(b, 16)) & M32
    a ^= c
    a = (a - rol(c, 4)) & M32
    b ^= a
    b = (b - rol(a, 14)) & M32
    c ^= b
    c = (c - rol(b, 24)) & M32
    return c


# --- golden values (from the C reference below; the first two from lookup3.c) --

LOOKUP3_SELFTEST = [
    (b"Four score and seven years ago", 0, 0x17770551),
    (b"Four score and seven years ago", 1, 0xCD628161),
]

GOLDEN_JHASH = [
    ("", 0, 0xDEADBEEF),
    ("", 0x5EED, 0xDEAE1DDC),
    ("61", 0, 0x58D68708),
    ("000102030405060708090a0b", 0, 0x5E4AA593),
    ("000102030405060708090a0b0c", 0, 0xBC9D6816),
    ("000102030405060708090a0b0c0d0e0f1011121314151617", 0x12345678, 0x938E41AB),
    (bytes(range(40)).hex(), 0xFFFFFFFF, 0x0B1CA1D6),
]

CLIENT = "2001:db8::1"
VIP = "2001:db8:100::80"

GOLDEN_FLOWS = [
    # (src, dst, sport, dport, seed, jhash of the 40-byte key)
    (CLIENT, VIP, 40000, 80, 0, 0xAE8ECB62),
    (CLIENT, VIP, 40000, 80, 0x5EED, 0xA356CF3F),
    ("fe80::1", "ff02::1", 1, 65535, 0xDEADBEEF, 0xFE81F134),
]


@pytest.mark.parametrize(("key", "seed", "expected"), LOOKUP3_SELFTEST)
def test_lookup3_selftest_values(key: bytes, seed: int, expected: int) -> None:
    assert jhash(key, seed) == expected
    assert jhash_literal(key, seed) == expected


@pytest.mark.parametrize(("key_hex", "seed", "expected"), GOLDEN_JHASH)
def test_jhash_golden(key_hex: str, seed: int, expected: int) -> None:
    key = bytes.fromhex(key_hex)
    assert jhash(key, seed) == expected
    assert jhash_literal(key, seed) == expected


def test_empty_key_returns_c_unmixed() -> None:
    assert jhash(b"", 0) == JHASH_INITVAL
    assert jhash(b"", 7) == JHASH_INITVAL + 7


@pytest.mark.parametrize(("src", "dst", "sport", "dport", "seed", "expected"), GOLDEN_FLOWS)
def test_flow_hash_golden(
    src: str, dst: str, sport: int, dport: int, seed: int, expected: int
) -> None:
    assert flow_hash(addr(src), addr(dst), sport, dport, seed) == expected
    assert jhash(flow_key(addr(src), addr(dst), sport, dport), seed) == expected


def test_flow_hash2_and_3_golden() -> None:
    assert flow_hash2(addr(CLIENT), 40000, 0x5EED) == 0x535145BE
    assert flow_hash2(addr("::"), 0, 0) == 0x690FAD70
    assert flow_hash3(addr(CLIENT), addr(VIP), 6, 0x5EED) == 0x52E7D650
    assert flow_hash3(addr(CLIENT), addr(VIP), 17, 0x5EED) == 0x630D3676


# --- key layout: nftables pads each field to a multiple of 4 bytes -----------


def test_key_layouts() -> None:
    src, dst = addr(CLIENT), addr(VIP)
    key = flow_key(src, dst, 0x1234, 80)
    assert len(key) == 40
    assert key[32:] == b"\x12\x34\x00\x00\x00\x50\x00\x00"
    key2 = flow_key2(src, 0x1234)
    assert len(key2) == 20
    assert key2 == src + b"\x12\x34\x00\x00"
    key3 = flow_key3(src, dst, 6)
    assert len(key3) == 36
    assert key3[32:] == b"\x06\x00\x00\x00"


# --- the fast paths against the general function and the literal reference ---


def test_jhash_matches_literal_for_every_length() -> None:
    rng = random.Random(7)
    for length in range(0, 100):
        for _ in range(5):
            key = rng.randbytes(length)
            seed = rng.getrandbits(32)
            assert jhash(key, seed) == jhash_literal(key, seed), (length, key.hex(), seed)


def test_fast_paths_match_general_jhash() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        src, dst = rng.randbytes(16), rng.randbytes(16)
        sport, dport = rng.getrandbits(16), rng.getrandbits(16)
        seed = rng.choice([0, 1, 0xFFFFFFFF, rng.getrandbits(32)])
        proto = rng.getrandbits(8)
        assert flow_hash(src, dst, sport, dport, seed) == jhash_literal(
            flow_key(src, dst, sport, dport), seed
        )
        assert flow_hash2(src, sport, seed) == jhash_literal(flow_key2(src, sport), seed)
        assert flow_hash3(src, dst, proto, seed) == jhash_literal(flow_key3(src, dst, proto), seed)


@given(
    src=st.binary(min_size=16, max_size=16),
    dst=st.binary(min_size=16, max_size=16),
    sport=st.integers(0, 0xFFFF),
    dport=st.integers(0, 0xFFFF),
    seed=st.integers(0, M32),
)
def test_flow_hash_property(src: bytes, dst: bytes, sport: int, dport: int, seed: int) -> None:
    h = flow_hash(src, dst, sport, dport, seed)
    assert 0 <= h <= M32
    assert h == jhash(flow_key(src, dst, sport, dport), seed)
    # any bytes-like works, including views into a packet
    assert flow_hash(bytearray(src), memoryview(dst), sport, dport, seed) == h


def test_flow_hash_packet_reads_the_same_fields() -> None:
    rng = random.Random(3)
    src, dst = rng.randbytes(16), rng.randbytes(16)
    # Ethernet (14) + IPv6 (40) + an 8-byte extension header + TCP
    ip6 = struct.pack("!IHBB", 6 << 28, 20, 0, 64) + src + dst
    tcp = struct.pack("!HH", 51000, 443) + bytes(16)
    frame = bytearray(14) + ip6 + bytes(8) + tcp
    expected = flow_hash(src, dst, 51000, 443, 0x5EED)
    assert flow_hash_packet(frame, 14, 14 + 40 + 8, 0x5EED) == expected
    assert flow_hash_packet(memoryview(frame), 14, 62, 0x5EED) == expected


# --- reciprocal_scale -----------------------------------------------------------


def test_reciprocal_scale_is_not_modulo() -> None:
    h = 0xAE8ECB62
    assert reciprocal_scale(h, 65537) == (h * 65537) >> 32 == 44687
    assert reciprocal_scale(h, 65537) != h % 65537
    assert flow_index(h, 65537, 1) == 44688
    assert reciprocal_scale(0, 10) == 0
    assert reciprocal_scale(M32, 10) == 9


@given(h=st.integers(0, M32), n=st.integers(1, M32))
def test_reciprocal_scale_range(h: int, n: int) -> None:
    assert 0 <= reciprocal_scale(h, n) < n


# --- a C reference, compiled at test time -----------------------------------

C_REFERENCE = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
static uint32_t rol(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }
static uint32_t le32(const uint8_t *p) {
  return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint32_t jh(const uint8_t *k, uint32_t len, uint32_t iv) {
  uint32_t a, b, c;
  a = b = c = 0xdeadbeefu + len + iv;
  while (len > 12) {
    a += le32(k); b += le32(k + 4); c += le32(k + 8);
    a -= c; a ^= rol(c, 4);  c += b;
    b -= a; b ^= rol(a, 6);  a += c;
    c -= b; c ^= rol(b, 8);  b += a;
    a -= c; a ^= rol(c, 16); c += b;
    b -= a; b ^= rol(a, 19); a += c;
    c -= b; c ^= rol(b, 4);  b += a;
    len -= 12; k += 12;
  }
  if (len == 0) return c;
  for (uint32_t i = 0; i < len; i++) {
    uint32_t v = (uint32_t)k[i] << (8 * (i % 4));
    if (i < 4) a += v; else if (i < 8) b += v; else c += v;
  }
  c ^= b; c -= rol(b, 14);
  a ^= c; a -= rol(c, 11);
  b ^= a; b -= rol(a, 25);
  c ^= b; c -= rol(b, 16);
  a ^= c; a -= rol(c, 4);
  b ^= a; b -= rol(a, 14);
  c ^= b; c -= rol(b, 24);
  return c;
}
int main(void) {
  static char line[8192], hex[8000];
  static uint8_t buf[4000];
  while (fgets(line, sizeof line, stdin)) {
    unsigned long seed;
    if (sscanf(line, "%lx %7999s", &seed, hex) != 2) return 1;
    if (!strcmp(hex, "-")) hex[0] = 0;
    size_t n = strlen(hex) / 2;
    for (size_t i = 0; i < n; i++) sscanf(hex + 2 * i, "%2hhx", &buf[i]);
    printf("%u\n", jh(buf, (uint32_t)n, (uint32_t)seed));
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def c_jhash(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    assert gcc is not None, "gcc is required for this test"
    d = tmp_path_factory.mktemp("jhash")
    (d / "jhash.c").write_text(C_REFERENCE)
    exe = d / "jhash"
    subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-o", str(exe), str(d / "jhash.c")], check=True)
    return exe


def run_c(exe: Path, cases: list[tuple[int, bytes]]) -> list[int]:
    text = "".join(f"{seed:x} {key.hex() or '-'}\n" for seed, key in cases)
    out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True)
    return [int(x) for x in out.stdout.split()]


@pytest.mark.tool
def test_jhash_against_c_reference(c_jhash: Path) -> None:
    rng = random.Random(2024)
    cases = [(rng.getrandbits(32), rng.randbytes(rng.randrange(0, 90))) for _ in range(3000)]
    cases += [(seed, bytes(n)) for n in range(0, 49) for seed in (0, 1, M32)]
    expected = run_c(c_jhash, cases)
    assert len(expected) == len(cases)
    for (seed, key), want in zip(cases, expected, strict=True):
        assert jhash(key, seed) == want, (seed, key.hex())


@pytest.mark.tool
def test_flow_keys_against_c_reference(c_jhash: Path) -> None:
    rng = random.Random(99)
    flows = [
        (rng.randbytes(16), rng.randbytes(16), rng.getrandbits(16), rng.getrandbits(16))
        for _ in range(1000)
    ]
    seeds = [rng.getrandbits(32) for _ in flows]
    cases = [(seed, flow_key(*f)) for seed, f in zip(seeds, flows, strict=True)]
    cases += [(seed, flow_key2(f[0], f[2])) for seed, f in zip(seeds, flows, strict=True)]
    cases += [
        (seed, flow_key3(f[0], f[1], f[2] & 0xFF)) for seed, f in zip(seeds, flows, strict=True)
    ]
    expected = run_c(c_jhash, cases)
    n = len(flows)
    for i, ((src, dst, sport, dport), seed) in enumerate(zip(flows, seeds, strict=True)):
        assert flow_hash(src, dst, sport, dport, seed) == expected[i]
        assert flow_hash2(src, sport, seed) == expected[n + i]
        assert flow_hash3(src, dst, sport & 0xFF, seed) == expected[2 * n + i]
    # the golden values above really are the C program's output
    golden = [(seed, bytes.fromhex(k)) for k, seed, _ in GOLDEN_JHASH]
    assert run_c(c_jhash, golden) == [want for _, _, want in GOLDEN_JHASH]


# --- the kernel itself ---------------------------------------------------------

KERNEL_SCRIPT = r"""
set -e
ip link set lo up
ip -6 addr add 2001:db8:100::80/128 dev lo nodad
ip -6 addr add 2001:db8::1/128 dev lo nodad
nft -f - <<'NFT'
table ip6 v6lb_test_flowhash {
  set seen4 { type inet_service . mark; flags dynamic; size 4096; }
  set seen2 { type inet_service . mark; flags dynamic; size 4096; }
  set seen3 { type inet_service . mark; flags dynamic; size 4096; }
  chain out {
    type filter hook output priority 0;
    ip6 daddr 2001:db8:100::80 tcp dport 80 tcp flags syn meta mark set jhash ip6 saddr . ip6 daddr . tcp sport . tcp dport mod 65537 seed 0x5eed update @seen4 { tcp sport . meta mark }
    ip6 daddr 2001:db8:100::80 tcp dport 80 tcp flags syn meta mark set jhash ip6 saddr . tcp sport mod 65537 seed 0x5eed offset 1 update @seen2 { tcp sport . meta mark }
    ip6 daddr 2001:db8:100::80 tcp dport 80 tcp flags syn meta mark set jhash ip6 saddr . ip6 daddr . meta l4proto mod 1000003 seed 0xdeadbeef update @seen3 { tcp sport . meta mark }
  }
}
NFT
"$PYTHON" - <<'PY'
import socket
for port in range(40000, 40100):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("2001:db8::1", port))
    s.setblocking(False)
    try:
        s.connect(("2001:db8:100::80", 80))
    except OSError:
        pass
    s.close()
PY
nft -j list table ip6 v6lb_test_flowhash
"""


def _kernel_marks(listing: str) -> dict[str, dict[int, int]]:
    sets: dict[str, dict[int, int]] = {}
    for item in json.loads(listing)["nftables"]:
        if "set" not in item:
            continue
        marks: dict[int, int] = {}
        for element in item["set"].get("elem", []):
            value = element["elem"]["val"] if "elem" in element else element
            port, mark = value["concat"]
            marks[port] = mark
        sets[item["set"]["name"]] = marks
    return sets


@pytest.mark.root
def test_kernel_nft_jhash_agrees(tmp_path: Path) -> None:
    """nft's jhash in a private network namespace (nothing outlives the test)."""
    for tool in ("unshare", "nft", "ip"):
        assert shutil.which(tool), f"{tool} is required for this test"
    script = tmp_path / "kernel.sh"
    script.write_text(KERNEL_SCRIPT)
    out = subprocess.run(
        ["unshare", "-n", "bash", str(script)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHON": sys.executable},
    )
    sets = _kernel_marks(out.stdout)
    src, dst = addr(CLIENT), addr(VIP)
    assert len(sets["seen4"]) == len(sets["seen2"]) == len(sets["seen3"]) == 100
    for port, mark in sets["seen4"].items():
        assert flow_index(flow_hash(src, dst, port, 80, 0x5EED), 65537) == mark, port
    for port, mark in sets["seen2"].items():
        assert flow_index(flow_hash2(src, port, 0x5EED), 65537, 1) == mark, port
    for mark in sets["seen3"].values():
        assert flow_index(flow_hash3(src, dst, 6, 0xDEADBEEF), 1000003) == mark
