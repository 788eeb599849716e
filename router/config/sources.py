"""A route's ``source:``: file drops, SFTP folders, webhooks and polled REST APIs."""

from __future__ import annotations

import posixpath
from typing import Annotated, Any, Literal

import httpx
from pydantic import Field, field_validator, model_validator

from connectors.file_ingest import Readiness
from connectors.file_source import PROCESSING_DIR
from ops.secrets import redact
from router.config.common import AuthConfig, JmesPath, Section, SftpLogin
from router.config_types import Duration, Rate, Size


class _DropSource(Section):
    """What the file and SFTP sources share: which names to take, and when a file counts as complete."""

    pattern: str = "*"
    ready: Any = "stable"
    """``stable``, ``rename``, ``marker`` or ``{marker: "{name}.done"}`` (see connectors.file_ingest)."""

    @field_validator("pattern")
    @classmethod
    def _in_the_folder(cls, pattern: str) -> str:
        if not pattern or "/" in pattern or pattern in (".", ".."):
            raise ValueError(f"pattern {pattern!r} must match file names in the folder, without '/'")
        return pattern

    @field_validator("ready")
    @classmethod
    def _known_signal(cls, ready: Any) -> Any:
        Readiness.parse(ready)
        return ready

    @property
    def readiness(self) -> Readiness:
        return Readiness.parse(self.ready)


class FileSourceConfig(_DropSource):
    """``source: {type: file}``: a local drop folder (POS exports)."""

    type: Literal["file"]
    path: str = Field(min_length=1)
    stable_for: Duration = 1.0
    archive: str | None = None
    errors: str | None = None
    poll: Duration = 1.0


class SftpSourceConfig(SftpLogin, _DropSource):
    """``source: {type: sftp}``: a supplier's SFTP folder, host key pinned in ``known_hosts``."""

    type: Literal["sftp"]
    remote_dir: str = Field(min_length=1)
    archive: str | None = None
    delete: bool = False
    errors: str | None = None
    poll: Duration = Field(5.0, gt=0)
    stable_for: Duration = 2.0
    claim_ttl: Duration = Field(600.0, gt=0)
    reconnect_max: Duration = Field(60.0, gt=0)
    """The longest wait between attempts while the server is unreachable (the backoff doubles up to it)."""
    """How long a claim on the server lives unless its router renews it (see connectors.sftp_source)."""

    @model_validator(mode="after")
    def _archive_or_delete(self) -> SftpSourceConfig:
        if bool(self.archive) == bool(self.delete):
            raise ValueError("give exactly one of archive: REMOTE_FOLDER or delete: true")
        inbox = posixpath.normpath(self.remote_dir)
        claims = posixpath.join(inbox, PROCESSING_DIR)
        for key, folder in (("archive", self.archive), ("errors", self.errors)):
            if folder and posixpath.normpath(folder) in (inbox, claims):
                raise ValueError(f"{key} ({folder}) must be a folder other than remote_dir ({inbox})")
        return self


class WebhookSourceConfig(Section):
    """``source: {type: webhook}``: served at POST /webhooks/<route name>."""

    type: Literal["webhook"]
    secret: str | None = Field(None, repr=False)
    signature: Literal["standard", "hex", "sha256-prefixed"] = "standard"
    signature_header: str | None = None
    json_schema: str | None = Field(None, alias="schema")
    max_body: Size = 1024 * 1024
    rate_limit: Rate | None = None
    tolerance: Duration = 300.0


class CursorConfig(Section):
    param: str = Field(min_length=1)
    next: JmesPath


class RestSourceConfig(Section):
    """``source: {type: rest}``: a polled REST API with cursor pagination."""

    type: Literal["rest"]
    url: str
    poll: Duration = Field(30.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)
    auth: AuthConfig | None = None
    cursor: CursorConfig | None = None
    id: JmesPath | None = None
    timeout: Duration = Field(30.0, gt=0)
    max_pages_per_poll: int = Field(1000, ge=1)
    max_page_bytes: Size = Field(32 * 1024 * 1024, ge=1)

    @field_validator("url")
    @classmethod
    def _polled_url(cls, url: str) -> str:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as error:
            raise ValueError(f"{redact(url)!r} is not a valid URL: {error}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"{parsed.copy_with(query=None)} must be http:// or https:// with a host")
        if parsed.userinfo:
            raise ValueError("the url must not carry credentials; give them under auth")
        return url


SourceConfig = Annotated[
    FileSourceConfig | SftpSourceConfig | WebhookSourceConfig | RestSourceConfig, Field(discriminator="type")
]
