"""SSH/SFTP connections shared by the SFTP source and target: login and host-key pinning.

The server's host key must be listed in the configured ``known_hosts``: an unknown or changed key is
refused before anything is exchanged, with both fingerprints in the error, so a rotated key or an
impostor is seen at once. No agent and no ``~/.ssh`` keys are consulted: only the configured login.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import paramiko

# What a lost, refused or misbehaving server raises; the caller drops the connection and reconnects.
SERVER_ERRORS = (OSError, EOFError, paramiko.SSHException)


class HostKeyRefused(paramiko.SSHException):
    """The server's host key is unknown to, or differs from, ``known_hosts``: nothing is exchanged with it."""


class ClientKeyUnusable(paramiko.SSHException):
    """The configured client key cannot be read or decrypted (missing file, wrong passphrase)."""


@dataclass(frozen=True)
class SftpEndpoint:
    """Where and as whom to log in to an SFTP server, the known_hosts pinning its key, timeouts in seconds.

    Built from a route's or target's validated ``SftpLogin`` (router.config) with its files resolved:
    the one copy of the login a source or target holds.
    """

    host: str
    port: int
    username: str
    known_hosts: Path
    password: str | None = field(default=None, repr=False)
    key_file: Path | None = None
    key_passphrase: str | None = field(default=None, repr=False)
    connect_timeout: float = 10.0
    io_timeout: float = 60.0

    @property
    def address(self) -> str:
        """``host:port`` of the server, as logs and errors name it."""
        return f"{self.host}:{self.port}"


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """Refuses a server whose host key known_hosts does not list (paramiko's policy hook)."""

    def __init__(self, endpoint: SftpEndpoint) -> None:
        self._endpoint = endpoint

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyRefused(
            f"host key of {self._endpoint.address} is unknown: the server offered {key.get_name()} "
            f"{key.fingerprint}, which {self._endpoint.known_hosts} does not list; refusing to connect"
        )


def describe(error: BaseException) -> str:
    """A server error as a readable detail (some paramiko errors carry no message)."""
    return str(error) or type(error).__name__


def is_refusal(error: BaseException) -> bool:
    """True when logging in as configured cannot work: a host key not pinned, the login not accepted, or
    the client key unusable. Retrying does not help until the configuration changes."""
    return isinstance(error, HostKeyRefused | ClientKeyUnusable | paramiko.AuthenticationException)


class SftpSession:
    """One SSH connection with its SFTP session, kept open between uses and replaced after a loss."""

    def __init__(self, endpoint: SftpEndpoint) -> None:
        self.endpoint = endpoint
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    @property
    def connected(self) -> bool:
        """True while the SSH transport is up (a server that went away shows as not connected)."""
        transport = self._client.get_transport() if self._client is not None else None
        return transport is not None and transport.is_active()

    def session(self) -> paramiko.SFTPClient | None:
        """The open SFTP session, or None when there is none or its connection was lost."""
        return self._sftp if self._sftp is not None and self.connected else None

    def connect(self) -> paramiko.SFTPClient:
        """Drop any old connection and log in afresh; raises HostKeyRefused, an auth or a server error."""
        self.close()
        endpoint = self.endpoint
        if not endpoint.known_hosts.is_file():
            raise HostKeyRefused(
                f"known_hosts file {endpoint.known_hosts} does not exist, so the host key of "
                f"{endpoint.address} cannot be verified; refusing to connect"
            )
        client = paramiko.SSHClient()
        try:
            client.load_system_host_keys(str(endpoint.known_hosts))
            client.set_missing_host_key_policy(_RefuseUnknownHost(endpoint))
            client.connect(
                endpoint.host,
                endpoint.port,
                username=endpoint.username,
                password=endpoint.password,
                pkey=self._client_key(),
                timeout=endpoint.connect_timeout,
                banner_timeout=endpoint.connect_timeout,
                auth_timeout=endpoint.connect_timeout,
                channel_timeout=endpoint.connect_timeout,
                allow_agent=False,
                look_for_keys=False,
            )
            sftp = client.open_sftp()
            channel = sftp.get_channel()
            if channel is not None:
                channel.settimeout(endpoint.io_timeout)
        except paramiko.BadHostKeyException as error:
            client.close()
            raise HostKeyRefused(
                f"host key of {endpoint.address} CHANGED: the server offered {error.key.get_name()} "
                f"{error.key.fingerprint}, but {endpoint.known_hosts} holds "
                f"{error.expected_key.fingerprint}; refusing to connect "
                "(if the server's key was rotated on purpose, update known_hosts)"
            ) from error
        except BaseException:
            client.close()
            raise
        self._client, self._sftp = client, sftp
        return sftp

    def close(self) -> None:
        """Close the SFTP session and its SSH connection, if any."""
        if self._client is not None:
            self._client.close()
        self._client = None
        self._sftp = None

    def _client_key(self) -> paramiko.PKey | None:
        key_file, passphrase = self.endpoint.key_file, self.endpoint.key_passphrase
        if key_file is None:
            return None
        try:
            # paramiko annotates the password as str, but hands it to cryptography, which needs bytes.
            return paramiko.PKey.from_path(
                key_file, passphrase.encode() if passphrase else None  # type: ignore[arg-type]
            )
        except (OSError, paramiko.SSHException) as error:
            raise ClientKeyUnusable(f"client key {key_file} cannot be used: {error}") from error
