"""`router validate` on hostile or mistaken YAML: alias bombs, foreign tags and bad secrets are refused
quickly at their position, exit 2, never with a traceback and never echoing a secret."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from router.config import ConfigError, load_config

TIMEOUT_S = 60.0
# The unbounded alias bomb reached 1.3 GB; the router's imports alone are about 100 MB.
MAX_RSS_KB = 300 * 1024

VALID = """\
version: 1
targets:
  erp: {type: http, url: "http://127.0.0.1:9/movements"}
routes:
  - name: pos
    source: {type: file, path: inbox}
    format: csv
    map: {type: sale, sku: {column: SKU}, location: {column: STORE}, quantity: {column: QTY}}
    deliver: [erp]
"""


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float
    max_rss_kb: int


def _high_water_kb(pid: int) -> int:
    """The process's own peak RSS (VmHWM), 0 once it has exited.

    Not wait4's ru_maxrss: Linux carries the parent's peak across fork and exec into it, so a child of
    a large test process would report the parent's memory.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _validate(config: Path, env: dict[str, str] | None = None) -> Run:
    """`router validate -c config` as a process, with its peak memory (sampled) and wall time."""
    out, err = config.with_suffix(".out"), config.with_suffix(".err")
    started = time.monotonic()
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "validate", "-c", str(config)],
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, **(env or {})},
        )
    peak_kb = 0
    while True:
        peak_kb = max(peak_kb, _high_water_kb(process.pid))
        pid, status, _usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - started > TIMEOUT_S:
            process.kill()
            os.wait4(process.pid, 0)
            raise AssertionError(f"router validate still running after {TIMEOUT_S:g}s")
        time.sleep(0.01)
    process.returncode = os.waitstatus_to_exitcode(status)
    return Run(
        process.returncode,
        out.read_text(),
        err.read_text(),
        time.monotonic() - started,
        peak_kb,
    )


def _write(folder: Path, text: str) -> Path:
    path = folder / "routes.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_an_alias_bomb_is_refused_fast_at_its_position(tmp_path: Path) -> None:
    levels = "".join(
        f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n"
        for previous, name in zip("abcdefgh", "bcdefghi", strict=True)
    )
    config = _write(
        tmp_path, VALID + 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + levels
    )

    run = _validate(config)

    assert run.code == 2, run.stderr
    assert "Traceback" not in run.stderr
    # f (about 600 000 values) is the first level past the bound: line 15, after VALID's 9 and a..e.
    assert f"{config}:15:4: YAML aliases expand this document beyond 100000 values" in run.stderr, run.stderr
    assert run.max_rss_kb < MAX_RSS_KB, f"{run.max_rss_kb} KB"


def test_python_and_other_unknown_tags_are_refused_at_their_position(tmp_path: Path) -> None:
    config = _write(tmp_path, VALID.replace("deliver: [erp]", "deliver: !!python/tuple [erp]"))

    run = _validate(config)

    assert run.code == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"{config}:9:14: YAML tag !!python/tuple is not allowed" in run.stderr, run.stderr
    assert run.max_rss_kb < MAX_RSS_KB


def test_a_recursive_alias_and_a_local_tag_are_refused(tmp_path: Path) -> None:
    recursive = _write(tmp_path, VALID + "loop: &loop [1, *loop]\n")
    assert "10:7: a YAML alias refers to a value that contains it" in _validate(recursive).stderr

    tagged = _write(tmp_path, VALID.replace("format: csv", "format: !shell csv"))
    run = _validate(tagged)
    assert run.code == 2 and f"{tagged}:7:13: YAML tag !shell is not allowed" in run.stderr, run.stderr


def test_anchors_and_merge_keys_stay_usable(tmp_path: Path) -> None:
    config = _write(
        tmp_path,
        VALID.replace(
            '  erp: {type: http, url: "http://127.0.0.1:9/movements"}',
            """\
  erp: &http
    type: http
    url: "http://127.0.0.1:9/movements"
    retry: {attempts: 3}
  wms:
    <<: *http
    url: "http://127.0.0.1:9/wms"
""",
        ),
    )

    loaded = load_config(config, {})

    assert loaded.targets["wms"].retry.attempts == 3 and loaded.targets["wms"].url.endswith("/wms")


def test_a_webhook_secret_that_is_not_base64_is_refused_without_echoing_it(tmp_path: Path) -> None:
    webhook = """\
      - name: partner
        source: {type: webhook, secret: "${PARTNER_SECRET}"}
        format: json
        map: {type: sale, sku: {path: sku}, location: {path: store}, quantity: {path: qty}}
        deliver: [erp]
    """
    config = _write(tmp_path, VALID + textwrap.indent(textwrap.dedent(webhook), "  "))
    secret = "whsec_not!base64~but$ecret"

    run = _validate(config, {"PARTNER_SECRET": secret})

    assert run.code == 2, run.stderr
    assert f"{config}:11:37: webhook secret starts with 'whsec_' but the rest is not base64" in run.stderr
    assert "not!base64" not in run.stderr + run.stdout


def test_yaml_nested_beyond_the_parser_s_depth_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    config = _write(tmp_path, VALID + "deep: " + "[" * 20_000 + "]" * 20_000 + "\n")

    with pytest.raises(ConfigError) as caught:
        load_config(config, {})

    assert [str(problem) for problem in caught.value.problems] == [
        f"{config}:1:1: YAML nests too deeply to read; routes.yaml needs a few levels"
    ]
