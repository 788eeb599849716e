"""routes.yaml loading: interpolation, the models, and problems reported all at once at their position."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from router.config import ConfigError, load_config
from router.config_source import interpolate
from router.config_types import parse_duration, parse_rate, parse_size

REPO = Path(__file__).resolve().parents[2]

VALID = """\
version: 1
broker: {url: "${BROKER:-memory://}"}
lookups:
  stores: {file: stores.csv, key: code, value: gln}
targets:
  erp:
    type: http
    url: http://127.0.0.1:9/movements
    auth: {bearer: "${ERP_TOKEN:-}"}
    accepts: [delta]
    batch: {max_events: 50, max_wait: 250ms}
    retry: {attempts: 3, initial: 100ms, max: 2s, max_age: 20m}
routes:
  - name: pos
    source: {type: file, path: inbox, pattern: "*.csv", stable_for: 2s}
    format: csv
    map:
      type: sale
      sku: {column: SKU}
      location: {column: STORE, lookup: stores}
      quantity: {column: QTY, as: decimal}
      occurred_at: {column: AT, as: datetime, tz: Europe/Paris}
    deliver: [erp]
"""


def _write(folder: Path, text: str) -> Path:
    (folder / "stores.csv").write_text("code,gln\nS1,0614141000012\n", encoding="utf-8")
    path = folder / "routes.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _problems(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, env or {})
    return [str(problem) for problem in caught.value.problems]


def test_the_shipped_sample_validates_with_no_environment() -> None:
    config = load_config(REPO / "routes.yaml", {})
    assert config.broker.url == ["memory://"]
    assert [route.name for route in config.enabled_routes] == ["pos-sales"]
    assert {route.source.type for route in config.routes} == {"file", "sftp", "webhook", "rest"}
    assert config.targets["erp"].auth is not None and config.targets["erp"].auth.bearer is None


def test_values_are_typed_and_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, VALID), {"ERP_TOKEN": "s3cret"})
    erp = config.targets["erp"]
    assert erp.batch is not None and erp.batch.max_wait == 0.25
    assert (erp.retry.initial, erp.retry.max, erp.retry.max_age) == (0.1, 2.0, 1200.0)
    assert erp.auth is not None and erp.auth.bearer == "s3cret"
    route = config.routes[0]
    assert [rule.target for rule in route.deliver_rules()] == ["erp"]
    assert route.sequence_key == ["sku", "location"]
    assert config.resolve_path("inbox") == tmp_path / "inbox"
    assert config.store.resolved_url(config.base_dir) == f"sqlite:///{tmp_path / 'router-state.db'}"
    assert "s3cret" not in config.summary() and "1 route(s)" in config.summary()


def test_every_problem_is_reported_at_once_with_line_and_column(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        version: 1
        broker: {url: "amqp://guest:guest@127.0.0.1:5672//", queue_tpye: quorum}
        targets:
          erp:
            type: http
            url: http://127.0.0.1:9/x
            timeout: soon
            partitions: 0
        routes:
          - name: pos
            source: {type: file, patern: "*.csv"}
            format: csv
            map: {type: sale, sku: {column: SKU}, location: {column: S, lookup: shops}}
            deliver: [erp, wsm]
          - name: pos
            source: {type: ftp, path: x}
            format: csv
            map: {type: sale}
            deliver: [erp]
        """,
    )
    problems = _problems(path)
    expected = [
        (2, "unknown key 'queue_tpye' in broker; did you mean 'queue_type'?"),
        (7, "targets.erp.timeout: expected a duration like 500ms, 2s, 5m or 1h, not 'soon'"),
        (8, "targets.erp.partitions"),
        (11, "unknown key 'patern' in routes[0].source; did you mean 'pattern'?"),
        (11, "missing required key 'path' in routes[0].source"),
        (14, "unknown target 'wsm'; defined: erp"),
        (15, "route name 'pos' is used twice"),
        (16, "routes[1].source.type must be one of 'file', 'sftp', 'webhook', 'rest'"),
    ]
    for line, text in expected:
        assert any(p.startswith(f"{path}:{line}:") and text in p for p in problems), (line, text, problems)
    assert len(problems) == len(expected), problems


def test_checks_that_need_the_whole_config_point_at_the_field(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        VALID.replace("file: stores.csv", "file: missing.csv")
        .replace("as: decimal", "as: money")
        .replace("type: sale", "type: stock.snapshot")
        .replace("deliver: [erp]", "deliver: [{target: erp, when: 'sku =='}]"),
    )
    problems = _problems(path)
    assert any(":4:" in p and "missing.csv" in p and "not found" in p for p in problems), problems
    assert any(":21:" in p and "as 'money' is not one of" in p for p in problems), problems
    assert any(":23:" in p and "not a valid JMESPath" in p for p in problems), problems
    assert any(":23:" in p and "accepts only delta" in p and "stock.snapshot" in p for p in problems), (
        problems
    )


def test_yaml_syntax_errors_give_their_position(tmp_path: Path) -> None:
    path = _write(tmp_path, "version: 1\ntargets:\n  erp: {type: http\nroutes: []\n")
    [problem] = _problems(path)
    assert problem.startswith(f"{path}:") and "YAML syntax" in problem


def test_unset_variable_is_a_problem_and_secrets_are_never_echoed(tmp_path: Path) -> None:
    problems = _problems(_write(tmp_path, VALID.replace('"${ERP_TOKEN:-}"', '"${ERP_TOKEN}"')))
    assert len(problems) == 1 and ":9:" in problems[0] and "ERP_TOKEN is not set" in problems[0], problems

    problems = _problems(_write(tmp_path, VALID.replace('"${ERP_TOKEN:-}"', "[hunter2]")))
    assert any(":9:" in p and "bearer" in p for p in problems) and not any("hunter2" in p for p in problems)

    config = load_config(_write(tmp_path, VALID), {"BROKER": "amqp://router:hunter2@mq:5672//"})
    assert "hunter2" not in config.summary() and "router:***@mq" in config.summary()


def test_broker_url_lists_every_node_of_a_cluster_in_either_form(tmp_path: Path) -> None:
    nodes = ["amqp://router:first-pass@mq1:5672//", "amqp://router:second-pass@mq2:5672//"]
    listed = VALID.replace(
        'broker: {url: "${BROKER:-memory://}"}', f"broker: {{url: [{nodes[0]}, {nodes[1]}]}}"
    )
    config = load_config(_write(tmp_path, listed), {})
    assert config.broker.url == nodes
    joined = load_config(_write(tmp_path, VALID), {"BROKER": " ; ".join(nodes)})
    assert joined.broker.url == nodes
    summary = joined.summary()
    assert "first-pass" not in summary and "second-pass" not in summary
    assert "router:***@mq1:5672//, amqp://router:***@mq2:5672//" in summary


def test_a_bad_url_in_the_broker_list_is_reported_at_its_own_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        VALID.replace(
            'broker: {url: "${BROKER:-memory://}"}',
            "broker:\n  url:\n    - amqp://router:top-secret@mq1:5672//\n    - http://router:top-secret@mq2//",
        ),
    )
    [problem] = _problems(path)
    assert problem.startswith(f"{path}:5:7: ") and "is no broker URL; expected amqp://" in problem, problem
    assert "top-secret" not in problem

    mixed = _write(tmp_path, VALID.replace("${BROKER:-memory://}", "memory://;amqp://mq1//"))
    [problem] = _problems(mixed)
    assert problem.startswith(f"{mixed}:2:") and "memory:// is a broker inside one process" in problem
    assert _problems(_write(tmp_path, VALID.replace("${BROKER:-memory://}", "amqp://mq1//;")))


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "1"}, "1"),
        ("${A:-x}", {}, "x"),
        ("${A:-x}", {"A": ""}, "x"),
        ("${A}/b/${B:-c}", {"A": "a"}, "a/b/c"),
        ("$${A}", {"A": "1"}, "${A}"),
        ("cost $5", {}, "cost $5"),
    ],
)
def test_interpolation(text: str, env: dict[str, str], expected: str) -> None:
    missing: list[str] = []
    assert interpolate(text, env, missing) == expected
    assert missing == []


def test_durations_sizes_and_rates() -> None:
    assert [parse_duration(v) for v in ("500ms", "2s", "5m", "1h", "7d", 3, "1.5s")] == [
        0.5,
        2.0,
        300.0,
        3600.0,
        604800.0,
        3.0,
        1.5,
    ]
    assert [parse_size(v) for v in ("64KiB", "1MiB", "10MB", 512)] == [65536, 1048576, 10_000_000, 512]
    assert parse_rate("100/s") == (100, 1.0) and parse_rate("600/m") == (600, 60.0)
    for bad, parse in (
        ("soon", parse_duration),
        ("-1s", parse_duration),
        ("lots", parse_size),
        ("0/s", parse_rate),
    ):
        with pytest.raises(ValueError):
            parse(bad)


def test_disabled_routes_are_validated_but_their_files_and_secrets_may_be_absent(tmp_path: Path) -> None:
    webhook = """\
      - name: partner
        enabled: ${PARTNER_ON:-false}
        source: {type: webhook, secret: "${PARTNER_SECRET:-}", schema: contract.json}
        format: json
        map: {type: sale, sku: {path: sku}, location: {path: store}, quantity: {path: qty, as: decimal}}
        deliver: [erp]
    """
    path = _write(tmp_path, VALID + textwrap.indent(textwrap.dedent(webhook), "  "))
    assert [r.name for r in load_config(path, {}).enabled_routes] == ["pos"]
    problems = _problems(path, {"PARTNER_ON": "true"})
    assert any("needs a secret" in p for p in problems) and any(
        "contract.json not found" in p for p in problems
    )


def test_validate_command_exit_codes(tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "router.cli", "validate", "-c", str(REPO / "routes.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert good.returncode == 0 and "ok: 6 route(s)" in good.stdout, good.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "router.cli", "validate", "-c", str(tmp_path / "nowhere.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_a_mapped_field_or_sequence_key_the_event_type_lacks_is_caught_before_any_record(
    tmp_path: Path,
) -> None:
    text = VALID.replace(
        "      sku: {column: SKU}", "      sku: {column: SKU}\n      register: {column: REG}"
    )
    problems = _problems(
        _write(tmp_path, text.replace("deliver: [erp]", "sequence_key: [sku, store]\n    deliver: [erp]"))
    )
    assert any(
        ":20:7:" in p and "'register'; did you mean 'register_id'? (sale events)" in p for p in problems
    )
    assert any(":25:" in p and "sequence_key unknown field 'store'" in p for p in problems), problems
    problems = _problems(_write(tmp_path, VALID.replace("type: sale", "type: sales")))
    assert any(":18:" in p and "unknown event type 'sales'; did you mean 'sale'?" in p for p in problems), (
        problems
    )


def test_file_and_sftp_targets_share_the_target_keys_and_sftp_needs_a_pinned_host_key(tmp_path: Path) -> None:
    targets = """\
      drop:
        type: file
        path: outbox
        format: csv
        batch: {max_events: 100, max_wait: 1s}
      edi:
        type: sftp
        host: 127.0.0.1
        username: router
        password: "${EDI_PASSWORD:-}"
        known_hosts: edi_known_hosts
        remote_dir: /inbound
        filename: "{target}-{key}.{ext}"
        timeot: 5s
    """
    text = VALID.replace("targets:\n", "targets:\n" + textwrap.indent(textwrap.dedent(targets), "  "))
    text = text.replace("deliver: [erp]", "deliver: [erp, drop, edi]")
    env = {"EDI_PASSWORD": "pw"}
    problems = _problems(_write(tmp_path, text), env)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "unknown key 'timeot' in targets.edi; did you mean 'timeout'?"
    ]
    text = "".join(line for line in text.splitlines(keepends=True) if "timeot" not in line)
    [problem] = _problems(_write(tmp_path, text), env)
    assert "edi_known_hosts not found" in problem and "host key must be pinned" in problem

    (tmp_path / "edi_known_hosts").write_text("[127.0.0.1]:22 ssh-ed25519 AAAA\n", encoding="utf-8")
    config = load_config(_write(tmp_path, text), env)
    drop, edi = config.targets["drop"], config.targets["edi"]
    assert (drop.type, drop.format, drop.filename) == ("file", "csv", "{target}-{key}.{ext}")
    assert edi.type == "sftp" and edi.location == "sftp://router@127.0.0.1:22/inbound"
    assert "pw" not in repr(edi)


def test_csv_dialect_is_checked_and_only_for_csv_routes(tmp_path: Path) -> None:
    def with_csv(block: str) -> str:
        return VALID.replace("    format: csv\n", f"    format: csv\n    csv: {block}\n")

    expected = {
        '{delimiter: ";;"}': "delimiter must be one character",
        "{encoding: klingon}": "unknown encoding 'klingon'",
        "{encoding: utf-16}": "not ASCII-compatible",
    }
    for block, message in expected.items():
        [problem] = _problems(_write(tmp_path, with_csv(block)))
        assert ":17:" in problem and message in problem, problem
    jsonl = with_csv("{delimiter: ';'}").replace("format: csv", "format: jsonl")
    problems = _problems(_write(tmp_path, jsonl))
    assert any("csv: applies to format: csv, not format: jsonl" in p for p in problems), problems

    config = load_config(_write(tmp_path, with_csv("{delimiter: ';'}")), {})
    assert config.routes[0].csv is not None and config.routes[0].csv.encoding == "utf-8"


def test_http_limits_have_defaults_and_are_validated_at_their_position(tmp_path: Path) -> None:
    defaults = load_config(_write(tmp_path, VALID), {}).http
    assert (defaults.max_connections, defaults.header_timeout, defaults.body_timeout) == (1000, 10.0, 30.0)
    assert (defaults.keep_alive, defaults.max_header_size, defaults.signature_failures) == (
        5.0,
        16384,
        (20, 60.0),
    )
    set_limits = (
        "http: {max_connections: 200, header_timeout: 5s, body_timeout: 1m, signature_failures: 5/m}\n"
    )
    tuned = load_config(_write(tmp_path, VALID + set_limits), {}).http
    assert (tuned.max_connections, tuned.header_timeout, tuned.body_timeout) == (200, 5.0, 60.0)
    assert tuned.signature_failures == (5, 60.0)

    path = _write(
        tmp_path,
        VALID
        + "http:\n  max_connections: 0\n  header_timeout: 0s\n  keep_alive: never\n  max_header_size: 100\n",
    )

    problems = _problems(path)
    for line, field in [
        (25, "max_connections"),
        (26, "header_timeout"),
        (27, "keep_alive"),
        (28, "max_header_size"),
    ]:
        assert any(p.startswith(f"{path}:{line}:") and f"http.{field}" in p for p in problems), (
            field,
            problems,
        )


def test_a_retry_that_would_outlive_the_brokers_consumer_timeout_is_refused(tmp_path: Path) -> None:
    broker = 'broker: {url: "${BROKER:-memory://}"'
    text = VALID.replace("max_age: 20m", "max_age: 1h").replace(broker, broker + ", consumer_timeout: 30m")
    text = text.replace("    retry:", "    timeout: 15s\n    retry:")

    [problem] = _problems(_write(tmp_path, text))

    assert problem.startswith(f"{tmp_path / 'routes.yaml'}:13:60: targets.erp.retry.max_age 1h outlives ")
    assert "broker.consumer_timeout 30m" in problem and "set max_age to at most 28m " in problem
    assert "raise the broker's consumer_timeout (rabbitmq.conf) and broker.consumer_timeout" in problem


def test_a_timeout_that_leaves_no_time_to_retry_is_refused(tmp_path: Path) -> None:
    broker = 'broker: {url: "${BROKER:-memory://}"'
    text = VALID.replace(broker, broker + ", consumer_timeout: 1m")
    text = text.replace("    retry:", "    timeout: 30s\n    retry:")

    [problem] = _problems(_write(tmp_path, text))

    assert ":12:14: targets.erp.timeout 30s leaves no time to retry within broker.consumer_timeout 1m" in (
        problem
    )


@pytest.mark.parametrize(
    ("ready", "signal", "marker"),
    [
        ("stable", "stable", None),
        ("rename", "rename", None),
        ("marker", "marker", "x.csv.done"),
        ('"{stem}.ok"', "marker", "x.ok"),
        ('{marker: "{name}.done"}', "marker", "x.csv.done"),
    ],
)
def test_ready_takes_a_signal_or_a_marker_template(
    tmp_path: Path, ready: str, signal: str, marker: str | None
) -> None:
    text = VALID.replace("stable_for: 2s}", f"stable_for: 2s, ready: {ready}}}")
    readiness = load_config(_write(tmp_path, text), {}).routes[0].source.readiness
    assert readiness.signal == signal
    if marker is not None:
        assert readiness.marker_for("x.csv") == marker


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("ready: stabel", "ready must be stable, rename, marker or"),
        ('ready: {marker: "done.txt"}', "must contain {name} or {stem}"),
        ('ready: {marker: "../{name}.done"}', "must be a name in the same folder"),
        ('ready: {marker: "{name}.done", wait: 1}', "ready must be stable, rename, marker or"),
        ('pattern: "../*.csv"', "must match file names in the folder"),
    ],
)
def test_ready_and_pattern_mistakes_are_reported_at_their_position(
    tmp_path: Path, setting: str, complaint: str
) -> None:
    text = VALID.replace('pattern: "*.csv", stable_for: 2s}', f"stable_for: 2s, {setting}}}")
    [problem] = _problems(_write(tmp_path, text))
    assert problem.startswith(f"{tmp_path / 'routes.yaml'}:15:") and complaint in problem, problem


def test_an_edi_route_needs_a_file_source_and_a_record_loop(tmp_path: Path) -> None:
    route = (
        "  - name: {name}\n"
        "    source: {source}\n"
        "    format: {fmt}\n"
        "    {records}\n"
        '    map: {{type: asn, asn_id: {{path: "header.BSN[0].e2"}}, gtin: {{path: "LIN[0].e3"}}}}\n'
        "    deliver: [erp]\n"
    )
    path = _write(
        tmp_path,
        VALID
        + route.format(name="x12-ok", source="{type: file, path: edi}", fmt="x12", records="records: HL:I")
        + route.format(name="x12-no-loop", source="{type: file, path: edi}", fmt="x12", records="")
        + route.format(name="edifact-hook", source="{type: webhook}", fmt="edifact", records="records: LIN"),
    )
    problems = _problems(path)
    assert any(":30:5: records is required for x12: the loop that is one record" in p for p in problems)
    assert any(
        ":38:13: format: edifact is read from files (file, sftp), not a webhook source" in p for p in problems
    )
    assert len(problems) == 3, problems  # the third: the webhook has no secret


def test_max_in_flight_defaults_to_the_partitions_and_cannot_exceed_them(tmp_path: Path) -> None:
    erp = load_config(_write(tmp_path, VALID), {}).targets["erp"]
    assert (erp.partitions, erp.max_in_flight, erp.in_flight_limit) == (8, None, 8)
    lowered = VALID.replace("    accepts: [delta]", "    max_in_flight: 2\n    accepts: [delta]")
    assert load_config(_write(tmp_path, lowered), {}).targets["erp"].in_flight_limit == 2

    too_many = VALID.replace("    accepts: [delta]", "    max_in_flight: 9\n    accepts: [delta]")
    [problem] = _problems(_write(tmp_path, too_many))

    assert problem.startswith(f"{tmp_path / 'routes.yaml'}:10:20: targets.erp.max_in_flight 9 exceeds")
    assert "max_in_flight 9 exceeds partitions 8" in problem and "lower max_in_flight" in problem
    zero = VALID.replace("    accepts: [delta]", "    max_in_flight: 0\n    accepts: [delta]")
    assert any("targets.erp.max_in_flight" in p for p in _problems(_write(tmp_path, zero)))


SFTP_AND_REST = """\
      - name: asn
        source:
          type: sftp
          host: 127.0.0.1
          username: router
          key_file: id_ed25519
          known_hosts: known_hosts
          remote_dir: /srv/inbound
          archive: /srv/archive
        format: csv
        map: {type: sale, sku: {column: SKU}, location: {column: STORE}, quantity: {column: QTY}}
        deliver: [erp]
      - name: orders
        source:
          type: rest
          url: http://127.0.0.1:9/orders
          cursor: {param: after, next: paging.next}
        format: json
        map: {type: sale, sku: {path: sku}, location: {path: store}, quantity: {path: qty}}
        deliver: [erp]
"""


NEXT_KEY = "\n          "
"""A line break into the next key of a source in SFTP_AND_REST."""
REST_URL = "url: http://127.0.0.1:9/orders"


@pytest.mark.parametrize(
    ("old", "new", "line", "complaint"),
    [
        ("archive: /srv/archive", "delete: false", 15, "exactly one of archive"),
        ("archive: /srv/archive", "delete: true" + NEXT_KEY + "archive: /a", 15, "exactly one of archive"),
        ("archive: /srv/archive", "archive: /srv/inbound/", 15, "must be a folder other than remote_dir"),
        ("archive: /srv/archive", "archive: /srv/archive" + NEXT_KEY + "errors: /srv/inbound/.processing", 15,
         "errors (/srv/inbound/.processing) must be a folder other than remote_dir"),
        ("key_file: id_ed25519", "port: 0", 19, "greater than or equal to 1"),
        ("key_file: id_ed25519", "port: 22", 15, "give key_file or password"),
        ("host: 127.0.0.1", 'host: ""', 17, "at least 1 character"),
        ("remote_dir: /srv/inbound", 'remote_dir: ""', 21, "at least 1 character"),
        ("archive: /srv/archive", "archive: /srv/a" + NEXT_KEY + "claim_ttl: 0s", 23, "greater than 0"),
        ("next: paging.next", 'next: "paging.["', 30, "is not valid JMESPath"),
        ("next: paging.next}", "next: paging.next}" + NEXT_KEY + "id: 'sku |'", 31, "is not valid JMESPath"),
        ("{param: after, next: paging.next}", "{param: after}", 30, "missing required key 'next'"),
        ("{param: after, next: paging.next}", '{param: "", next: paging.next}', 30, "at least 1 character"),
        (REST_URL, "url: ftp://127.0.0.1/orders", 29, "must be http:// or https://"),
        (REST_URL, "url: http://user:pw@127.0.0.1/orders", 29, "must not carry credentials"),
        (REST_URL, REST_URL + NEXT_KEY + "max_page_bytes: 0", 30, "greater than or equal to 1"),
        (REST_URL, REST_URL + NEXT_KEY + "auth: {bearer: t, basic: {username: u, password: p}}", 30,
         "auth has both bearer and basic"),
    ],
)
def test_connector_settings_are_refused_by_validate_at_their_line(
    tmp_path: Path, old: str, new: str, line: int, complaint: str
) -> None:
    """What a source or target would refuse on start is reported by `router validate`, at its line."""
    routes = textwrap.indent(textwrap.dedent(SFTP_AND_REST.replace(old, new, 1)), "  ")
    text = VALID.replace("routes:\n", "routes:\n" + routes)
    (tmp_path / "known_hosts").write_text("[127.0.0.1]:22 ssh-ed25519 AAAA\n", encoding="utf-8")
    [problem] = _problems(_write(tmp_path, text))
    assert problem.startswith(f"{tmp_path / 'routes.yaml'}:{line}:") and complaint in problem, problem


@pytest.mark.parametrize(
    ("filename", "complaint"),
    [
        ("{target}-{sku}.{ext}", "unknown placeholder {sku}"),
        ("{target}-{date}.{ext}", "must contain {key}"),
        ("../{key}.{ext}", "must name a file inside the folder"),
        (".{key}.{ext}", "no leading dot"),
        ("{key.{ext}", "is malformed"),
        ("{key!r}.{ext}", "no format spec or conversion"),
    ],
)
@pytest.mark.parametrize("kind", ["file", "sftp"])
def test_a_file_or_sftp_targets_filename_is_checked_by_validate(
    tmp_path: Path, kind: str, filename: str, complaint: str
) -> None:
    where = "path: outbox" if kind == "file" else (
        "host: 127.0.0.1, username: router, password: pw, known_hosts: known_hosts, remote_dir: /in"
    )
    target = f'  drop: {{type: {kind}, {where}, filename: "{filename}"}}\n'
    text = VALID.replace("targets:\n", "targets:\n" + target)
    [problem] = _problems(_write(tmp_path, text))
    assert problem.startswith(f"{tmp_path / 'routes.yaml'}:6:") and complaint in problem, problem


def test_sftp_and_rest_knobs_have_defaults_and_can_be_set(tmp_path: Path) -> None:
    text = VALID.replace("routes:\n", "routes:\n" + textwrap.indent(textwrap.dedent(SFTP_AND_REST), "  "))
    (tmp_path / "known_hosts").write_text("[127.0.0.1]:22 ssh-ed25519 AAAA\n", encoding="utf-8")
    asn, orders = load_config(_write(tmp_path, text), {}).routes[:2]
    assert (asn.source.claim_ttl, asn.source.reconnect_max) == (600.0, 60.0)
    assert (orders.source.max_page_bytes, orders.source.max_pages_per_poll) == (32 * 1024 * 1024, 1000)
    sftp_knobs = "\n      claim_ttl: 15m\n      reconnect_max: 5m"
    text = text.replace("remote_dir: /srv/inbound", "remote_dir: /srv/inbound" + sftp_knobs)
    rest_knobs = "\n      max_page_bytes: 4MiB\n      max_pages_per_poll: 50"
    text = text.replace(REST_URL, "url: http://127.0.0.1:9/orders" + rest_knobs)
    asn, orders = load_config(_write(tmp_path, text), {}).routes[:2]
    assert (asn.source.claim_ttl, asn.source.reconnect_max) == (900.0, 300.0)
    assert (orders.source.max_page_bytes, orders.source.max_pages_per_poll) == (4 * 1024 * 1024, 50)
