"""A real OpenSSH sshd on a loopback port for SFTP tests: its own host key, a client key, optional password.

The server runs as the current user (root) with a config of its own under a temporary folder, so it
touches nothing of the machine's ssh setup. Password login needs a password for that user: the server
then runs in a private mount namespace where a copy of /etc/shadow with a test password is mounted
over the real one, so the machine's accounts stay untouched.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

SSHD = Path("/usr/sbin/sshd")
PRIVILEGE_SEPARATION_DIR = Path("/run/sshd")
CLIENT_KEY_PASSPHRASE = "pallet-backroom-7"
START_TIMEOUT = 10.0


def _unavailable(message: str) -> None:
    """Skip on a developer machine, fail in CI, when the machine cannot run the SFTP server."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI must provide it)")
    pytest.skip(message)


def require_sshd(*, password: bool = False) -> None:
    """Make sure OpenSSH (and, for password login, a private mount namespace) is available."""
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        _unavailable(f"OpenSSH server is not installed ({SSHD} and ssh-keygen are needed)")
    if password:
        probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10, check=False)
        if probe.returncode != 0:
            _unavailable(f"password login needs a private mount namespace: {probe.stderr.decode().strip()}")


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def generate_key(path: Path, passphrase: str = "") -> Path:
    """An ed25519 key pair at ``path`` and ``path.pub``."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", path.name, "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (sshd's per-connection processes), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        below = children.get(pending.pop(), [])
        found.extend(below)
        pending.extend(below)
    return found


class SftpServer:
    """One sshd serving SFTP on 127.0.0.1:<port>; stop() and restart() keep its port and host key."""

    def __init__(self, folder: Path, *, password: str | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.username = pwd.getpwuid(os.getuid()).pw_name
        self.password = password
        self.host_key = generate_key(folder / "ssh_host_ed25519_key")
        self.client_key = generate_key(folder / "client_ed25519", CLIENT_KEY_PASSPHRASE)
        self.known_hosts = folder / "known_hosts"
        self.known_hosts.write_text(self.known_hosts_line(self.host_key), encoding="utf-8")
        (folder / "authorized_keys").write_text(
            Path(f"{self.client_key}.pub").read_text(encoding="utf-8"), encoding="utf-8"
        )
        self.log_file = folder / "sshd.log"
        self._config = self._write_config()
        self._process: subprocess.Popen[bytes] | None = None

    def route_login(self) -> dict[str, Any]:
        """The connection keys of an sftp source or target in routes.yaml for this server (key login)."""
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "username": self.username,
            "key_file": str(self.client_key),
            "key_passphrase": CLIENT_KEY_PASSPHRASE,
            "known_hosts": str(self.known_hosts),
        }

    def known_hosts_line(self, host_key: Path) -> str:
        """The known_hosts entry saying ``host_key`` belongs to this server's host and port."""
        key_type, key_base64 = Path(f"{host_key}.pub").read_text(encoding="utf-8").split()[:2]
        return f"[127.0.0.1]:{self.port} {key_type} {key_base64}\n"

    @property
    def host_key_fingerprint(self) -> str:
        """The server host key's SHA256 fingerprint as OpenSSH prints it."""
        listing = subprocess.run(
            ["ssh-keygen", "-l", "-E", "sha256", "-f", f"{self.host_key}.pub"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return listing.stdout.split()[1]

    def _write_config(self) -> Path:
        config = self.folder / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.folder / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.folder / 'authorized_keys'}",
                    "Subsystem sftp internal-sftp",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin yes",
                    "PubkeyAuthentication yes",
                    f"PasswordAuthentication {'yes' if self.password else 'no'}",
                    "KbdInteractiveAuthentication no",
                    "UseDNS no",
                    "LoginGraceTime 15",
                    "MaxStartups 50",
                    "LogLevel VERBOSE",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        return config

    def _command(self) -> list[str]:
        sshd = [str(SSHD), "-D", "-e", "-f", str(self._config)]
        if not self.password:
            return sshd
        shadow = self.folder / "shadow"
        hashed = subprocess.run(
            ["openssl", "passwd", "-6", "-stdin"],
            input=self.password,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        lines = Path("/etc/shadow").read_text(encoding="utf-8").splitlines()
        shadow.write_text(
            "".join(
                f"{self.username}:{hashed}:{line.split(':', 2)[2]}\n"
                if line.startswith(f"{self.username}:")
                else f"{line}\n"
                for line in lines
            ),
            encoding="utf-8",
        )
        shadow.chmod(0o640)
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount --bind "$0" /etc/shadow && exec "$@"',
            str(shadow),
            *sshd,
        ]

    def start(self) -> None:
        """Start sshd and wait until its port accepts connections."""
        PRIVILEGE_SEPARATION_DIR.mkdir(mode=0o755, exist_ok=True)
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                output = self.log_file.read_text(errors="replace")
                raise RuntimeError(f"sshd exited with {self._process.returncode}:\n{output}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not listen on 127.0.0.1:{self.port} within {START_TIMEOUT}s")

    def stop(self) -> None:
        """Stop sshd and every session it serves, as when the server goes away."""
        process, self._process = self._process, None
        if process is None:
            return
        for pid in _descendants(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def restart(self) -> None:
        """Stop, then start again on the same port with the same host key."""
        self.stop()
        self.start()

    @contextlib.contextmanager
    def client(self) -> Iterator[paramiko.SFTPClient]:
        """An SFTP session as a supplier would open one, to drop and inspect files."""
        ssh = paramiko.SSHClient()
        ssh.load_system_host_keys(str(self.known_hosts))
        ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            ssh.connect(
                "127.0.0.1",
                self.port,
                username=self.username,
                pkey=paramiko.PKey.from_path(self.client_key, CLIENT_KEY_PASSPHRASE.encode()),
                timeout=10,
                banner_timeout=10,
                auth_timeout=10,
                allow_agent=False,
                look_for_keys=False,
            )
            sftp = ssh.open_sftp()
            channel = sftp.get_channel()
            if channel is not None:
                channel.settimeout(10)
            yield sftp
        finally:
            ssh.close()


@contextlib.contextmanager
def running_sftp_server(folder: Path, *, password: str | None = None) -> Iterator[SftpServer]:
    """A started SftpServer under ``folder`` (skipped locally / failed in CI without OpenSSH); stops after."""
    require_sshd(password=password is not None)
    folder.mkdir(parents=True, exist_ok=True)
    server = SftpServer(folder, password=password)
    server.start()
    try:
        yield server
    finally:
        server.stop()
