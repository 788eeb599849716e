"""A three-node RabbitMQ cluster on this machine, for the failover tests.

Each node is its own ``rabbitmq-server`` (node name ``rabbit-t<N>@localhost``, AMQP on 127.0.0.1:568N,
Erlang distribution on 2568N, no plugins), run as the ``rabbitmq`` user with a temporary HOME that
holds the cluster's own Erlang cookie, so the shared node on 5672 and its cookie are never touched.
Nodes two and three join node one with ``join_cluster``; quorum queues then get a member on each.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
RUN_AS = "rabbitmq"
NODES = 3
AMQP_PORT = 5681
DIST_PORT = 25681
START_TIMEOUT = 60.0
CTL_TIMEOUT = 60.0


class ClusterUnavailable(RuntimeError):
    """The cluster could not be started on this machine; the message says what failed."""


@dataclass
class Node:
    """One node of the test cluster."""

    index: int
    base: Path

    @property
    def name(self) -> str:
        return f"rabbit-t{self.index}@localhost"

    @property
    def port(self) -> int:
        return AMQP_PORT + self.index - 1

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def folder(self) -> Path:
        return self.base / f"node{self.index}"

    def environment(self, home: Path) -> dict[str, str]:
        """The server's environment: everything it writes lives under this node's folder."""
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            # The system rabbitmq-env.conf names the shared node; this one names nothing.
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.folder / "advanced.config"),
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_DIST_PORT": str(DIST_PORT + self.index - 1),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }


@dataclass
class RabbitCluster:
    """Start, fault and tear down the three nodes; ``urls`` lists their AMQP URLs in node order."""

    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="router-rabbit-cluster-")))
    nodes: list[Node] = field(init=False)
    _servers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    _down: set[int] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        self.nodes = [Node(index, self.base) for index in range(1, NODES + 1)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def home(self) -> Path:
        return self.base / "home"

    def start(self) -> None:
        """Boot the three nodes in parallel and cluster them; raises ClusterUnavailable on failure."""
        if os.geteuid() != 0:
            raise ClusterUnavailable(f"starting nodes as the {RUN_AS!r} user needs root")
        if not SERVER.exists() or not CTL.exists():
            raise ClusterUnavailable(f"{SERVER} or {CTL} is missing: RabbitMQ is not installed here")
        try:
            account = pwd.getpwnam(RUN_AS)
        except KeyError:
            raise ClusterUnavailable(f"there is no {RUN_AS!r} user to run the nodes as") from None
        for node in self.nodes:
            for port in (node.port, DIST_PORT + node.index - 1):
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        raise ClusterUnavailable(
                            f"port {port} of {node.name} is taken (another test session's cluster?)"
                        )
        self._write_files()
        for path in [self.base, *self.base.rglob("*")]:
            os.chown(path, account.pw_uid, account.pw_gid)
        for node in self.nodes:
            self._boot(node)
        deadline = time.monotonic() + START_TIMEOUT
        for node in self.nodes:
            self._await(node, deadline)
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", self.nodes[0].name)
            self.ctl(node, "start_app")
        running = self.ctl(self.nodes[0], "eval", "length(rabbit_nodes:all_running()).")
        if running.strip() != str(NODES):
            raise ClusterUnavailable(
                f"the cluster formed with {running.strip()} running node(s), not {NODES}"
            )

    def _write_files(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "enabled_plugins").write_text("[].\n")
        for node in self.nodes:
            for folder in ("mnesia", "log"):
                (node.folder / folder).mkdir(parents=True, exist_ok=True)
            (node.folder / "rabbitmq.conf").write_text(
                f"listeners.tcp.local = 127.0.0.1:{node.port}\n"
                "loopback_users = none\n"
                # The host's disk may be shared and nearly full; the tests must not block on its alarm.
                "disk_free_limit.absolute = 1MB\n"
            )
            (node.folder / "advanced.config").write_text("[].\n")

    def _boot(self, node: Node) -> None:
        log = (node.folder / "server.out").open("ab")
        command = ["runuser", "-u", RUN_AS, "--", "env", "-i"]
        command += [f"{key}={value}" for key, value in node.environment(self.home).items()]
        self._servers[node.index] = subprocess.Popen(
            [*command, str(SERVER)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _await(self, node: Node, deadline: float) -> None:
        """Wait until ``node`` runs RabbitMQ (``await_startup`` fails at once until it is known to epmd)."""
        while True:
            server = self._servers[node.index]
            if server.poll() is not None:
                raise ClusterUnavailable(f"{node.name} exited with {server.returncode}:\n{self._tail(node)}")
            remaining = deadline - time.monotonic()
            try:
                self.ctl(
                    node, "await_startup", "--timeout", str(max(1, int(remaining))), timeout=remaining + 5
                )
                return
            except ClusterUnavailable as error:
                if time.monotonic() + 1 > deadline:
                    raise ClusterUnavailable(
                        f"{node.name} did not start: {error}\n{self._tail(node)}"
                    ) from None
            time.sleep(1)

    @staticmethod
    def _tail(node: Node) -> str:
        return (node.folder / "server.out").read_text(errors="replace")[-2000:]

    def ctl(self, node: Node, *arguments: str, timeout: float = CTL_TIMEOUT) -> str:
        """Run ``rabbitmqctl -n NODE ...`` with the cluster's cookie; returns its output."""
        command = ["runuser", "-u", RUN_AS, "--", "env", "-i"]
        command += [f"{key}={value}" for key, value in node.environment(self.home).items()]
        command += [str(CTL), "-n", node.name, *arguments]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise ClusterUnavailable(f"rabbitmqctl {' '.join(arguments)} on {node.name} timed out") from None
        if done.returncode != 0:
            raise ClusterUnavailable(
                f"rabbitmqctl {' '.join(arguments)} on {node.name} failed: {done.stdout}{done.stderr}"
            )
        return done.stdout

    def stop_app(self, node: Node) -> None:
        """Stop the RabbitMQ application on ``node``: its clients are disconnected, the VM stays up."""
        self.ctl(node, "stop_app")
        self._down.add(node.index)

    def start_app(self, node: Node) -> None:
        """Start the application again and wait until the node serves AMQP."""
        self.ctl(node, "start_app")
        self.ctl(node, "await_startup", "--timeout", "30", timeout=40)
        self._down.discard(node.index)

    def kill(self, node: Node) -> None:
        """SIGKILL the node's Erlang VM: its sockets drop without a goodbye, as when a host dies."""
        server = self._servers[node.index]
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(15)
        self._down.add(node.index)

    def restart(self, node: Node) -> None:
        """Boot a killed node again on its data; it rejoins the cluster it belongs to."""
        self._boot(node)
        self._await(node, time.monotonic() + START_TIMEOUT)
        self._down.discard(node.index)

    def heal(self) -> None:
        """Bring back every node a test stopped or killed, so the next test starts on three nodes."""
        for node in self.nodes:
            if node.index not in self._down:
                continue
            if self._servers[node.index].poll() is None:
                self.start_app(node)
            else:
                self.restart(node)

    def queues(self, prefix: str) -> dict[str, list[str]]:
        """The queues whose name starts with ``prefix``, each with the nodes holding a replica."""
        listing = self.ctl(self.nodes[0], "list_queues", "-q", "--no-table-headers", "name", "members")
        found: dict[str, list[str]] = {}
        for line in listing.splitlines():
            name, _, members = line.strip().partition("\t")
            if name.startswith(prefix):
                found[name] = re.findall(r"rabbit-t\d@localhost", members)
        return found

    def delete_queues(self, prefix: str) -> None:
        """Delete the queues and the exchange a test declared under ``prefix``."""
        from kombu import Connection

        with Connection(self.urls[0]) as connection:
            for name in self.queues(prefix):
                channel = connection.channel()
                channel.queue_delete(name)
                channel.close()
            channel = connection.channel()
            channel.exchange_delete(prefix)
            channel.close()

    def stop(self) -> None:
        """Stop every node and remove all their data."""
        for node in self.nodes:
            server = self._servers.get(node.index)
            if server is None or server.poll() is not None:
                continue
            with contextlib.suppress(ClusterUnavailable):
                self.ctl(node, "stop", timeout=30)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait(5)
        shutil.rmtree(self.base, ignore_errors=True)
