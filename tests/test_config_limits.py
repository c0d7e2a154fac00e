"""Bounds on reading a config file (issue 21 point 5): size, nesting, numbers, quoting.

Each case used to end in a traceback (exit 1), minutes of CPU, gigabytes of
memory or a message as long as the file; now each is a ConfigError (exit 2)
that names the file, where, and a fix, found before the cost is paid.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from v6lb.cli import main
from v6lb.model.config import ConfigError, load_config, parse_config

LB = {"addresses": ["2001:db8:0:1::2"]}
BIG = 1024 * 1024  # a 1 MB string
NEST = "lists and mappings nest more than 32 levels deep"


@pytest.fixture(params=["libyaml", "pure-python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test with libyaml's event parser and again with PyYAML's own."""
    if request.param == "pure-python":
        import v6lb.model.config_read as config_read

        monkeypatch.setattr(config_read, "_LIBYAML", False)
    yield str(request.param)


def vip(mode: str = "nat", **kw: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "web",
        "address": "2001:db8:0:10::80",
        "ports": [443],
        "mode": mode,
        "backends": [{"address": "2001:db8:0:20::1"}],
    }
    data.update(kw)
    return data


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lb.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kw)
    return info.value


def reject(data: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "x.yaml")
    return info.value


# --- nesting ---------------------------------------------------------------------------

DEEP = [
    pytest.param("vips: " + "[" * 10_000 + "]" * 10_000 + "\n", id="flow-lists"),
    pytest.param("vips: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n", id="flow-mappings"),
    pytest.param("vips:\n" + "- " * 10_000 + "1\n", id="block-lists"),
    pytest.param(
        "topology:\n"
        + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(1000))
        + " " * 1001
        + "x: 1\n",
        id="block-mappings",
    ),
]


@pytest.mark.parametrize("text", DEEP)
def test_deep_nesting_is_refused(tmp_path: Path, text: str, parser: str) -> None:
    # Used to be RecursionError (a traceback, exit 1).
    err = load_error(write(tmp_path, text))
    assert err.message == NEST
    assert err.path.startswith("line ")
    assert err.fix.startswith("flatten the structure")


def test_nesting_limit_is_32(tmp_path: Path, parser: str) -> None:
    # The top-level mapping is level 1, so 31 lists inside it make 32.
    ok = load_error(write(tmp_path, "vipz: " + "[" * 31 + "]" * 31 + "\n"))
    assert ok.message == "unknown section `vipz` in the file"  # read; the schema refuses it
    assert load_error(write(tmp_path, "vipz: " + "[" * 32 + "]" * 32 + "\n")).message == NEST


def test_aliases_count_towards_depth(tmp_path: Path, parser: str) -> None:
    # Each anchor nests 20 levels; the alias puts one inside another: 40 in all.
    text = "x: &a " + "[" * 20 + "]" * 20 + "\ny: " + "[" * 20 + "*a" + "]" * 20 + "\n"
    err = load_error(write(tmp_path, text))
    assert err.message == NEST + " once aliases (*name) are expanded"
    assert err.path == "line 2, column 11"  # the list where the count passes 32


def test_merge_key_chain_counts_as_depth(tmp_path: Path, parser: str) -> None:
    lines = ["m0: &m0 {k: 1}"] + [f"m{i}: &m{i} {{<<: *m{i - 1}}}" for i in range(1, 40)]
    err = load_error(write(tmp_path, "\n".join(lines) + "\n"))
    assert err.message == NEST + " once aliases (*name) are expanded"


# --- aliases ---------------------------------------------------------------------------


def test_alias_bomb_is_refused_fast(tmp_path: Path, parser: str) -> None:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path = write(tmp_path, "topology:\n" + "".join(f"  {line}\n" for line in lines))
    start = time.perf_counter()
    err = load_error(path)
    assert time.perf_counter() - start < 1.0
    assert err.message == "aliases (*name) expand this to more than 524288 values"
    assert err.path == "line 7, column 7"  # a5: 9**6 = 531441 values; a4 (9**5) would pass
    assert "alias bomb" in err.fix


def test_alias_cycle_is_refused(tmp_path: Path, parser: str) -> None:
    err = load_error(write(tmp_path, "topology: &t {nodes: [*t]}\n"))
    assert err.message == "an alias (*name) refers to a list or mapping that contains it"
    assert err.path == "line 1, column 11"


def test_ordinary_aliases_and_merge_keys_still_work(tmp_path: Path, parser: str) -> None:
    text = """\
lb: {addresses: ["2001:db8:0:1::2"]}
vips:
  - &web
    name: web
    address: "2001:db8:0:10::80"
    ports: [443]
    mode: nat
    health: &h {type: tcp, interval: 5}
    backends: [{address: "2001:db8:0:20::1"}]
  - <<: *web
    name: web2
    address: "2001:db8:0:10::81"
    health: *h
"""
    config = load_config(write(tmp_path, text))
    assert [v.name for v in config.vips] == ["web", "web2"]
    assert config.vips[1].health.interval == 5.0
    assert config.vips[1].backends == config.vips[0].backends


def test_value_count_is_bounded_by_the_size_limit(tmp_path: Path, parser: str) -> None:
    path = write(tmp_path, "vips: [" + "1, " * 40 + "1]\n")  # 129 bytes, 43 values
    err = load_error(path, max_bytes=1000)  # 1000 // 32 = 31 values
    assert err.message == "the file holds more than 31 values"
    assert err.path == "line 1, column 92"
    assert "V6LB_MAX_CONFIG_BYTES" in err.fix


# --- numbers ---------------------------------------------------------------------------


def test_huge_integer_is_refused_before_conversion(tmp_path: Path, parser: str) -> None:
    # Used to be ValueError "Exceeds the limit (4300 digits)" (a traceback, exit 1).
    err = load_error(write(tmp_path, "lb:\n  flow_hash_seed: " + "9" * 5000 + "\n"))
    assert str(err) == (
        f"{tmp_path / 'lb.yaml'}: line 2, column 19: an integer of 5000 digits is too long;"
        " fix: write integers with at most 20 digits: no v6lb setting takes a larger one"
    )


@pytest.mark.parametrize(
    ("literal", "digits", "most"),
    [
        ("1" + "0" * 20, 21, 20),
        ("0x" + "f" * 17, 17, 16),
        ("0b" + "1" * 65, 65, 64),
        ("9" * 30 + ":59", 32, 20),  # base 60, as YAML 1.1 reads it
    ],
)
def test_integer_forms_are_bounded(tmp_path: Path, literal: str, digits: int, most: int) -> None:
    err = load_error(write(tmp_path, f"lb: {{flow_hash_seed: {literal}}}\n"))
    assert err.message == f"an integer of {digits} digits is too long"
    assert err.fix.startswith(f"write integers with at most {most} digits")


def test_integers_within_the_bound_reach_the_schema(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "lb: {flow_hash_seed: 0xFFFF_FFFF, conntrack_max: 0400}\n")
    )
    assert config.lb.flow_hash_seed == 0xFFFFFFFF
    err = load_error(write(tmp_path, "lb: {flow_hash_seed: " + "9" * 20 + "}\n"))
    assert str(err).endswith(
        "lb.flow_hash_seed: 99999999999999999999 is out of range;"
        " fix: use an integer jhash seed (32 bits) from 0 to 4294967295"
    )


def test_malformed_integer_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "lb: {flow_hash_seed: 0x_}\n"))
    assert err.message == "'0x_' is not a number"
    assert err.path == "line 1, column 22"


def test_long_float_is_refused(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "lb: {flow_hash_seed: 1." + "5" * 50 + "}\n"))
    assert err.message == "a number of 52 characters is too long"


@pytest.mark.parametrize(
    ("literal", "message"),
    [
        ("1.0e+999", "the number inf is not an integer"),
        (".nan", "the number nan is not an integer"),
        ("-.inf", "the number -inf is not an integer"),
        ("1e999", "the string '1e999' is not an integer"),  # YAML 1.1: no dot, so a string
        ("2.5", "the number 2.5 is not an integer"),
    ],
)
def test_floats_are_refused_where_integers_are_expected(
    tmp_path: Path, literal: str, message: str
) -> None:
    err = load_error(write(tmp_path, f"lb: {{conntrack_max: {literal}}}\n"))
    assert err.path == "lb.conntrack_max"
    assert err.message == message


def test_non_finite_seconds_are_refused(tmp_path: Path) -> None:
    text = (
        "lb: {addresses: ['2001:db8:0:1::2']}\nvips:\n- {name: w, address: '2001:db8::80',"
        " ports: [80], mode: nat, backends: [{address: '2001:db8::1'}], health: {interval: .nan}}\n"
    )
    err = load_error(write(tmp_path, text))
    assert err.path == "vips[0].health.interval"
    assert err.message == "nan is out of range"


def test_huge_python_int_in_parse_config_is_described_not_printed() -> None:
    # str() of an int over 4300 digits raises ValueError: the message must not call it.
    err = reject({"lb": {"flow_hash_seed": 10**5000}})
    assert err.message == "a number of about 5000 digits is out of range"


# --- size --------------------------------------------------------------------------------


def test_oversized_file_is_refused_from_its_size_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with open(path, "wb") as fh:
        fh.truncate(17 * 1024 * 1024)  # 17 MiB, written in no time (a sparse file)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        err = load_error(path)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 1024 * 1024  # the 17 MiB were never read
    assert str(err) == (
        f"{path}: the file is 17825792 bytes, more than the limit of 16777216 bytes;"
        " fix: shorten it, or raise the limit: V6LB_MAX_CONFIG_BYTES=BYTES"
        " (default 16777216, 16 MiB)"
    )


def test_unsized_input_is_read_only_up_to_the_limit() -> None:
    # /dev/zero has no size to stat and never ends: only a bounded read returns.
    start = time.perf_counter()
    err = load_error(Path("/dev/zero"), max_bytes=4096)
    assert time.perf_counter() - start < 1.0
    assert err.message == "the file is more than 4096 bytes, more than the limit of 4096 bytes"


def test_pipe_over_the_limit_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    writer = subprocess.Popen(
        [sys.executable, "-c", f"open({str(fifo)!r}, 'w').write('# x\\n' * 1000)"]
    )
    try:
        err = load_error(fifo, max_bytes=1000)
    finally:
        writer.kill()
        writer.wait()
    assert err.message == "the file is more than 1000 bytes, more than the limit of 1000 bytes"


def test_size_limit_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "lb: {instance: edge}\n" + "#" * 178 + "\n")  # 200 bytes, 5 values
    monkeypatch.setenv("V6LB_MAX_CONFIG_BYTES", "200")
    assert load_config(path).lb.instance == "edge"
    monkeypatch.setenv("V6LB_MAX_CONFIG_BYTES", "199")
    assert load_error(path).message == "the file is 200 bytes, more than the limit of 199 bytes"
    monkeypatch.setenv("V6LB_MAX_CONFIG_BYTES", "16M")
    err = load_error(path)
    assert err.message == "the environment variable V6LB_MAX_CONFIG_BYTES='16M' is not a byte count"
    assert err.fix == (
        "set it to a whole number of bytes from 1 to 1073741824 (1 GiB),"
        " or unset it for the default 16777216 (16 MiB)"
    )


# --- quoting -------------------------------------------------------------------------------

X = "x" * BIG
QUOTED_KEY = "'" + "x" * 23 + "... (1048576 characters)"  # in a field path

LONG_VALUES = [
    pytest.param({"lb": {"instance": X}}, "lb.instance", id="instance"),
    pytest.param({"lb": {"interfaces": [X]}}, "lb.interfaces[0]", id="interface"),
    pytest.param({"lb": {"control_socket": "/" + X}}, "lb.control_socket", id="control-socket"),
    pytest.param({"lb": {"addresses": [X]}}, "lb.addresses[0]", id="address"),
    pytest.param({"lb": {"addresses": [X + "/64"]}}, "lb.addresses[0]", id="address-with-slash"),
    pytest.param({"lb": {"conntrack_max": X}}, "lb.conntrack_max", id="integer"),
    pytest.param({"lb": {X: 1}}, "lb." + QUOTED_KEY, id="unknown-key"),
    pytest.param({X: 1}, QUOTED_KEY, id="unknown-section"),
    pytest.param({"lb": LB, "vips": [vip(name=X)]}, "vips[0].name", id="vip-name"),
    pytest.param({"lb": LB, "vips": [vip(mode=X)]}, "vips[0].mode", id="mode"),
    pytest.param({"lb": LB, "vips": [vip(protocol=X)]}, "vips[0].protocol", id="choice"),
    pytest.param(
        {
            "lb": LB,
            "vips": [vip("dsr-l2", ports=[80], backends=[{"address": "2001:db8::1", "mac": X}])],
        },
        "vips[0].backends[0].mac",
        id="mac",
    ),
    pytest.param(
        {"lb": LB, "vips": [vip(health={"type": "http", "path": "/ " + X})]},
        "vips[0].health.path",
        id="health-path",
    ),
    pytest.param(
        {"lb": LB, "vips": [vip("proxy-l4", dual_stack=X)]}, "vips[0].dual_stack", id="ipv4"
    ),
    pytest.param(
        {"npt": [{"inside": X, "outside": "2001:db8:1::/48"}]}, "npt[0].inside", id="prefix"
    ),
    pytest.param(
        {"npt": [{"inside": X + "/48", "outside": "2001:db8:1::/48"}]},
        "npt[0].inside",
        id="prefix-slash",
    ),
]


@pytest.mark.parametrize(("data", "path"), LONG_VALUES)
def test_a_long_value_is_quoted_short(data: dict[str, Any], path: str) -> None:
    err = reject(data)
    assert err.path == path
    assert len(err.path) + len(err.message) < 300, str(err)
    assert len(str(err)) < 600  # with a fix that lists the known keys
    assert "x" * 81 not in str(err)
    assert re.search(r"\.\.\. \(10485\d\d characters\)", err.message)


@pytest.mark.parametrize(
    "text",
    [
        # An implicit key is at most 1024 characters long; `? KEY` has no limit.
        pytest.param(f"lb:\n  ? {X}\n  : 1\n  ? {X}\n  : 2\n", id="duplicate-key"),
        pytest.param(f"lb: !{X} 1\n", id="unknown-tag"),
        pytest.param(f'lb: {{instance: "{X}"}}\n', id="string"),
    ],
)
def test_a_long_value_in_the_yaml_is_quoted_short(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    err = load_error(path)
    assert len(str(err)) < 300 + len(str(path)), str(err)
    assert "x" * 81 not in str(err)


def test_control_character_is_an_error_not_a_traceback(tmp_path: Path, parser: str) -> None:
    err = load_error(write(tmp_path, "lb:\n  instance: a\x01b\n"))
    assert err.path == "line 2, column 14"
    assert err.message == "the file holds the control character #x0001, which YAML does not allow"


def test_every_message_is_capped() -> None:
    # The net under any site that forgets to quote: message and fix cut in the middle.
    err = ConfigError("x.yaml", "a", "m" * 10_000, "f" * 10_000)
    assert len(err.message) < 700 and len(err.fix) < 700
    assert "(9400 characters cut)" in err.message


# --- backends and the control socket --------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "hint"), [("nat", ""), ("proxy-l4", " (for a service on the LB host itself, use ::1)")]
)
def test_backend_may_not_be_an_lb_address(mode: str, hint: str) -> None:
    lb = {"addresses": ["2001:db8:0:1::2", "2001:db8:0:1::3"]}
    backends = [{"address": "2001:db8:0:20::1"}, {"address": "2001:db8:0:1::3"}]
    err = reject({"lb": lb, "vips": [vip(mode, backends=backends)]})
    assert str(err) == (
        "x.yaml: vips[0].backends[1].address: 2001:db8:0:1::3 is the LB's own address"
        " (lb.addresses[1]); fix: a backend must be a real server's own address, not the LB's"
        + hint
    )


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "/run/v6lb/../../tmp/lb.sock",
            "'/run/v6lb/../../tmp/lb.sock' has a '..' component, so it names a place outside"
            " the directory it seems to be in",
        ),
        (
            "/run/v6lb/..",
            "'/run/v6lb/..' has a '..' component, so it names a place outside"
            " the directory it seems to be in",
        ),
        (
            "/run/v6lb/lb\x00.sock",
            "'/run/v6lb/lb\\x00.sock' holds a control character (a NUL or a newline, say)",
        ),
        ("run/v6lb/lb.sock", "'run/v6lb/lb.sock' is not usable as a Unix socket path"),
    ],
)
def test_control_socket_path_is_checked(path: str, message: str) -> None:
    err = reject({"lb": {"control_socket": path}})
    assert err.path == "lb.control_socket"
    assert err.message == message


def test_control_socket_dots_inside_names_are_fine() -> None:
    config = parse_config({"lb": {"control_socket": "/run/v6lb/..lb..sock"}})
    assert config.lb.control_socket == "/run/v6lb/..lb..sock"


# --- every command exits 2 --------------------------------------------------------------------

BAD_FILES = {
    "deep": "vips: " + "[" * 10_000 + "]" * 10_000 + "\n",
    "bigint": "lb:\n  flow_hash_seed: " + "9" * 5000 + "\n",
    "longstring": 'lb: {instance: "' + X + '"}\n',
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_check_exits_2_without_a_traceback(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path, BAD_FILES[kind])
    done = subprocess.run(
        [sys.executable, "-m", "v6lb.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(f"v6lb: error: {path}: ")
    assert "Traceback" not in done.stderr
    assert len(done.stderr) < 400
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "FILE"],
        ["run", "FILE"],
        ["status", "FILE"],
        ["explain", "--topology", "FILE"],
        ["demo", "--topology", "FILE", "--out", "OUT"],
        ["backend", "FILE", "--address", "2001:db8::1"],
        ["lab", "up", "FILE", "--name", "limits"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_every_command_that_loads_a_config_exits_2(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[:2] == ["lab", "up"] and os.geteuid() != 0:
        pytest.skip("lab up asks for root before it reads the file")
    path = write(tmp_path, BAD_FILES["bigint"])
    args = [str(path) if a == "FILE" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"v6lb: error: {path}: line 2, column 19: an integer of 5000 digits")
    assert not (tmp_path / "out").exists()


def test_valid_example_is_unchanged_by_the_limits() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "basic.yaml"
    text = example.read_text(encoding="utf-8")
    assert load_config(example) == parse_config(yaml.safe_load(text), str(example))


def test_run_control_socket_option_is_checked_like_the_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "basic.yaml"
    bad = "/run/v6lb/../../tmp/lb.sock"
    assert main(["run", str(example), "--control-socket", bad]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: v6lb run ")  # a command-line error
    assert err.split("\n", err.count("\n") - 1)[-1] == (
        f"v6lb: error: --control-socket: '{bad}' has a '..' component, so it names a place"
        " outside the directory it seems to be in; fix: write the path without '..', such as"
        " /run/v6lb/lb0.sock\n"
    )
    assert not Path("/tmp/lb.sock").exists()
