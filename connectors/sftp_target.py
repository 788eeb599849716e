"""SFTP delivery target: uploads each request's rendered payload as one file into a partner's remote folder.

The upload goes to a hidden temporary name in ``remote_dir`` (its size checked against the server's),
then is renamed over the final name with OpenSSH's posix-rename, so the partner never picks up a partial
file. A server without that extension (or whose policy denies it) gets remove-then-rename instead: the
old file is briefly absent, but a partial one is still never visible. Names follow the same
``filename`` pattern as file targets (see :mod:`connectors.file_target`).

The connection stays open between requests. A lost connection or an unreachable server is retried in
place and the next attempt reconnects; an unknown or changed host key, a refused login or an unusable
client key are permanent (like an HTTP 401): the dead letter says what to fix and a replay resends.
Temporary files a lost connection left behind are removed once the server is reachable again.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import posixpath
import threading
from dataclasses import dataclass, field
from typing import Any

import paramiko

from connectors.circuit import CircuitSettings
from connectors.delivery import AttemptKind, AttemptResult
from connectors.file_target import (
    DEFAULT_FILENAME,
    FileWritingTarget,
    temporary_name,
)
from connectors.retry import RetryPolicy
from connectors.sftp_session import SERVER_ERRORS, SftpEndpoint, SftpSession, describe, is_refusal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SftpTargetSettings:
    """One SFTP target: the server and login, remote folder, file naming, retry. The endpoint's timeouts
    bound each connect and each server reply (the target's ``timeout``, in seconds)."""

    name: str
    endpoint: SftpEndpoint
    remote_dir: str
    filename: str = DEFAULT_FILENAME
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    circuit: CircuitSettings = field(default_factory=CircuitSettings)

    @property
    def timeout(self) -> float:
        """Seconds one attempt may wait on the server: what the delivery worker budgets per attempt."""
        return self.endpoint.io_timeout


class SftpTarget(FileWritingTarget[SftpTargetSettings]):
    """Delivers payloads as files on an SFTP server over one kept-open connection, retrying in place."""

    kind = "sftp target"

    def __init__(self, settings: SftpTargetSettings, **hooks: Any) -> None:
        """``hooks`` are FileWritingTarget's injectable sleep, clock, on_attempt and now."""
        super().__init__(settings, **hooks)
        self._connection = SftpSession(settings.endpoint)
        self._address = settings.endpoint.address
        # Connection state is shared by whoever delivers through this target.
        self._lock = threading.Lock()
        self._posix_rename = True
        self._leftovers: set[str] = set()

    def write_once(self, name: str, payload: bytes) -> AttemptResult:
        """Upload ``payload`` to a hidden temporary name in remote_dir and rename it to ``name``."""
        with self._lock:
            try:
                sftp = self._session()
            except SERVER_ERRORS as error:
                self._connection.close()
                detail = f"{self._where}: cannot connect to {self._address}: {describe(error)}"
                if is_refusal(error):
                    return AttemptResult(AttemptKind.permanent, None, detail, reason="sftp_login")
                return AttemptResult(AttemptKind.retry, None, detail)
            final = posixpath.join(self.settings.remote_dir, name)
            temporary = posixpath.join(self.settings.remote_dir, temporary_name(name))
            try:
                sftp.putfo(io.BytesIO(payload), temporary, file_size=len(payload), confirm=True)
                self._rename(sftp, temporary, final)
            except SERVER_ERRORS as error:
                return self._failure(sftp, temporary, final, error)
            return AttemptResult(
                AttemptKind.success,
                None,
                f"{self._where}: uploaded {len(payload)} bytes to {self._address}:{final}",
            )

    def close(self) -> None:
        """Close the SFTP session and its SSH connection."""
        with self._lock:
            self._connection.close()

    def _session(self) -> paramiko.SFTPClient:
        """The open session, reconnecting when there is none; removes temporary files left by a lost one."""
        sftp = self._connection.session()
        if sftp is None:
            sftp = self._connection.connect()
            log.info("%s: connected to SFTP server %s as %s", self._where, self._address,
                     self.settings.endpoint.username, extra={"target": self.settings.name})
        for leftover in sorted(self._leftovers):
            self._remove_temporary(sftp, leftover)
        return sftp

    def _remove_temporary(self, sftp: paramiko.SFTPClient, temporary: str) -> None:
        """Remove a temporary upload; one the server cannot remove now stays listed for a later attempt."""
        try:
            sftp.remove(temporary)
        except FileNotFoundError:
            pass
        except SERVER_ERRORS:
            self._leftovers.add(temporary)
            return
        self._leftovers.discard(temporary)

    def _rename(self, sftp: paramiko.SFTPClient, temporary: str, final: str) -> None:
        """Rename ``temporary`` over ``final``: atomically with posix-rename where the server allows it."""
        if not self._posix_rename:
            _replace(sftp, temporary, final)
            return
        try:
            sftp.posix_rename(temporary, final)
            return
        except OSError as error:
            if not _posix_rename_refused(error):
                raise
            refusal = describe(error)
        _replace(sftp, temporary, final)
        self._posix_rename = False
        log.warning(
            "%s: SFTP server %s refuses posix-rename (%s); files are replaced by remove and rename",
            self._where, self._address, refusal, extra={"target": self.settings.name},
        )

    def _failure(
        self, sftp: paramiko.SFTPClient, temporary: str, final: str, error: BaseException
    ) -> AttemptResult:
        """Classify a failed upload or rename, and remove its temporary file (now or after reconnecting)."""
        what = f"{self._where}: cannot upload {final} to {self._address}: {describe(error)}"
        # A status the server answered is an OSError; anything else (EOF, a timeout, a reset or closed
        # channel) leaves the session in doubt, so the next attempt starts on a fresh connection.
        answered = (
            isinstance(error, OSError)
            and not isinstance(error, TimeoutError | ConnectionError)
            and self._connection.connected
        )
        if not answered:
            self._connection.close()
            self._leftovers.add(temporary)
            return AttemptResult(AttemptKind.retry, None, f"{what} (connection dropped; reconnecting)")
        self._remove_temporary(sftp, temporary)
        code = getattr(error, "errno", None)
        if code == errno.EACCES:
            hint = f"check the remote folder's permissions for {self.settings.endpoint.username}"
            return AttemptResult(AttemptKind.permanent, None, f"{what}; {hint}", reason="sftp_error")
        if code == errno.ENOENT:
            return AttemptResult(
                AttemptKind.retry, None, f"{what}; does remote_dir {self.settings.remote_dir} exist?"
            )
        return AttemptResult(AttemptKind.retry, None, what)


def _replace(sftp: paramiko.SFTPClient, temporary: str, final: str) -> None:
    """Plain SFTP rename does not overwrite: remove the old file first (briefly absent, never partial)."""
    with contextlib.suppress(FileNotFoundError):
        sftp.remove(final)
    sftp.rename(temporary, final)


def _posix_rename_refused(error: OSError) -> bool:
    """True when the server does not know posix-rename (SSH_FX_OP_UNSUPPORTED) or its policy denies it
    (OpenSSH's ``sftp-server -P posix-rename`` answers permission denied; the upload itself had succeeded)."""
    unsupported = type(error) is OSError and error.errno is None and "unsupported" in str(error).lower()
    return unsupported or isinstance(error, PermissionError)
