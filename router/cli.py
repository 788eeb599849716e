"""The `router` command line: validate, run, demo, status, schema, deadletter, replay, audit, store, console.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad configuration.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console

from ops import tracing
from ops.logging import configure_logging
from ops.secrets import redact
from router.audit_cli import audit
from router.cli_common import EXIT_CONFIG, EXIT_RUNTIME, config_option, load_or_exit
from router.config import find_config_path
from router.deadletter_cli import deadletter
from router.history_cli import replay_history
from router.store_cli import store_group
from router.terminal import printable

log = logging.getLogger("router")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING or ERROR.")
@click.option("--log-json/--no-log-json", default=None, help="JSON log lines (default: when not a terminal).")
def main(log_level: str, log_json: bool | None) -> None:
    """The retail inventory router: POS files, supplier SFTP, partner webhooks and REST APIs in;
    ERP, WMS and OMS kept aligned, in order, without losing or doubling a movement."""
    configure_logging(log_level, json=log_json)
    if tracing.configure_from_environment():
        log.info("tracing: spans exported over OTLP/HTTP (OTEL_EXPORTER_OTLP_* settings)")


@main.command()
@config_option
def validate(config_path: str | None) -> None:
    """Check routes.yaml; report every problem as FILE:LINE:COL: message (exit 2)."""
    config = load_or_exit(config_path)
    click.echo(config.summary())


@main.command()
@config_option
@click.option(
    "--only",
    type=click.Choice(["sources", "transform", "delivery", "http"]),
    multiple=True,
    help="Run only these stages (repeatable); default all. Several processes may share one RabbitMQ.",
)
@click.option("--route", "route_name", metavar="NAME", help="Run only this route's source and transform.")
def run(config_path: str | None, only: tuple[str, ...], route_name: str | None) -> None:
    """Run the router until SIGTERM or Ctrl-C, then drain without losing work in hand."""
    from router.runtime import STAGES, RouterRuntime

    config = load_or_exit(config_path)
    try:
        runtime = RouterRuntime(
            config,
            only=only or STAGES,
            route=route_name,
            http_worker_command=_http_worker_command(config_path, route_name),
        )
    except ValueError as error:
        click.echo(f"router run: {redact(str(error))}", err=True)
        sys.exit(EXIT_CONFIG)
    try:
        runtime.run_until_signalled()
    except Exception as error:
        log.exception("router stopped on an error")
        click.echo(f"router run: {redact(str(error))}", err=True)
        sys.exit(EXIT_RUNTIME)


def _http_worker_command(config_path: str | None, route_name: str | None) -> list[str]:
    """`router run --only http` with this invocation's logging options: one more http.workers process."""
    options = click.get_current_context().find_root().params
    log_json = options.get("log_json")
    command = [sys.executable, "-m", "router.cli", "--log-level", str(options.get("log_level", "INFO"))]
    if log_json is not None:
        command.append("--log-json" if log_json else "--no-log-json")
    command += ["run", "-c", str(find_config_path(config_path)), "--only", "http"]
    return command + (["--route", route_name] if route_name else [])


@main.command()
@config_option
@click.option(
    "--timeout", default=60.0, show_default=True, help="Seconds to wait for the scenario to finish."
)
@click.pass_context
def demo(ctx: click.Context, config_path: str | None, timeout: float) -> None:
    """A finite end-to-end scenario: a POS file through the router to simulated ERP, WMS and OMS."""
    from router.demo import run_demo

    if ctx.find_root().params.get("log_level") == "INFO":
        # The demo prints its own story; routine INFO lines would interleave with it.
        configure_logging("WARNING", json=ctx.find_root().params.get("log_json"))

    path = find_config_path(config_path)
    if not path.exists():
        click.echo(
            f"router demo: no configuration at {path}; run it from the repository or pass -c", err=True
        )
        sys.exit(EXIT_CONFIG)
    sys.exit(run_demo(path, Console(), timeout=timeout))


@main.command("test")
@config_option
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
def test_routes(config_path: str | None, files: tuple[Path, ...]) -> None:
    """Run route unit tests: input fixtures in, expected canonical events out (tests/routes/*.yaml)."""
    from router.route_tests import DEFAULT_PATTERN, RouteTestFileError, run_test_file

    config = load_or_exit(config_path)
    paths = list(files) or sorted(config.base_dir.glob(DEFAULT_PATTERN))
    if not paths:
        click.echo(
            f"router test: no test files given and none match {config.base_dir / DEFAULT_PATTERN}", err=True
        )
        sys.exit(EXIT_CONFIG)
    passed = failed = 0
    for path in paths:
        try:
            results = run_test_file(config, path)
        except RouteTestFileError as error:
            click.echo(f"ERROR {error}", err=True)
            sys.exit(EXIT_CONFIG)
        for result in results:
            if result.passed:
                passed += 1
                click.echo(f"PASS {path}: {printable(result.case)}")
                continue
            failed += 1
            click.echo(f"FAIL {path}: {printable(result.case)}")
            for difference in result.differences:
                click.echo(f"    {printable(difference)}")
    click.echo(f"{passed} passed, {failed} failed")
    sys.exit(EXIT_RUNTIME if failed else 0)


@main.command()
@click.argument("event_type", required=False)
def schema(event_type: str | None) -> None:
    """Print the JSON Schema of the canonical events (or of one TYPE, e.g. stock.snapshot)."""
    from canonical.schema import json_schema

    try:
        document = json_schema(event_type)
    except (KeyError, ValueError) as error:
        click.echo(f"router schema: {error.args[0] if error.args else error}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(json.dumps(document, indent=2))


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(config_path: str | None, as_json: bool) -> None:
    """Routes, targets, queue depths and open dead letters."""
    from router.status import collect_status, render_status

    config = load_or_exit(config_path)
    report = collect_status(config)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        render_status(report, Console())
    if report.get("errors"):
        sys.exit(EXIT_RUNTIME)


@main.group("console")
def console_group() -> None:
    """The web console: helpers for its configuration."""


@console_group.command("hash-password")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin (for scripts)."
)
def hash_password_command(password_stdin: bool) -> None:
    """Print a scrypt hash of a password for console.users in routes.yaml (the password is not echoed)."""
    from router.console.passwords import hash_password

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    if not password:
        click.echo("router console hash-password: the password is empty", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(hash_password(password))


main.add_command(deadletter)
main.add_command(replay_history)
main.add_command(audit)
main.add_command(store_group)


if __name__ == "__main__":
    main()
