"""Operations on a folder of an SFTP server, as the SFTP source needs them.

A listing that keeps a name that is not UTF-8 (as surrogate escapes) instead of failing, ``mkdir -p``,
and a rename into a folder that never overwrites a file already there.
"""

from __future__ import annotations

import posixpath
from datetime import UTC, datetime
from pathlib import PurePosixPath

import paramiko
from paramiko.sftp import CMD_CLOSE, CMD_HANDLE, CMD_NAME, CMD_OPENDIR, CMD_READDIR, SFTPError


def _stamped(name: str) -> str:
    """``name`` with a UTC timestamp before its extension, so it still matches the route's pattern."""
    path = PurePosixPath(name)
    return f"{path.stem}.{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}{path.suffix}"


def wire(path: str) -> bytes:
    """A path as the server spells it: a name listed with bytes that are not UTF-8 keeps them."""
    return path.encode("utf-8", "surrogateescape")


def list_folder(sftp: paramiko.SFTPClient, folder: str) -> list[paramiko.SFTPAttributes]:
    """The entries of ``folder`` with lstat attributes, like ``listdir_attr``, but a name that is not
    UTF-8 comes back with its bytes as surrogate escapes instead of failing the whole listing (which
    would stop every file of the route behind one badly named file)."""
    # paramiko's listdir_attr decodes names strictly and has no bytes variant, so this is its loop
    # (the same requests and attribute parsing) with a lenient decode.
    kind, message = sftp._request(CMD_OPENDIR, wire(folder))  # type: ignore[attr-defined]
    if kind != CMD_HANDLE:
        raise SFTPError(f"listing {folder}: expected a handle from the server")
    handle = message.get_binary()
    entries: list[paramiko.SFTPAttributes] = []
    try:
        while True:
            try:
                kind, message = sftp._request(CMD_READDIR, handle)  # type: ignore[attr-defined]
            except EOFError:
                return entries
            if kind != CMD_NAME:
                raise SFTPError(f"listing {folder}: expected names from the server")
            for _ in range(message.get_int()):
                name = message.get_string().decode("utf-8", "surrogateescape")
                long_name = message.get_string().decode("utf-8", "replace")
                attributes = paramiko.SFTPAttributes._from_msg(message, name, long_name)  # type: ignore[attr-defined]
                if name not in (".", ".."):
                    entries.append(attributes)
    finally:
        sftp._request(CMD_CLOSE, handle)  # type: ignore[attr-defined]


def exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.lstat(wire(path))
    except FileNotFoundError:
        return False
    return True


def ensure_dir(sftp: paramiko.SFTPClient, folder: str) -> None:
    """Create ``folder`` and its missing parents on the server (``mkdir -p``)."""
    if exists(sftp, folder):
        return
    parent = posixpath.dirname(folder.rstrip("/"))
    if parent and parent != folder:
        ensure_dir(sftp, parent)
    try:
        sftp.mkdir(folder)
    except OSError:
        sftp.stat(folder)  # another router created it meanwhile; raises when it really could not be made


def move_into(sftp: paramiko.SFTPClient, source: str, folder: str, name: str) -> str:
    """Rename ``source`` into ``folder`` as ``name`` without overwriting anything; returns the new path."""
    ensure_dir(sftp, folder)
    target = posixpath.join(folder, name)
    if exists(sftp, target):
        target = posixpath.join(folder, _stamped(name))
    sftp.rename(wire(source), wire(target))
    return target
