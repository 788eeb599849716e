"""``targets:``: HTTP, file and SFTP targets, with their retries, batches and payload shapes."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from connectors.file_target import DEFAULT_FILENAME, FilenamePattern
from router.config.common import AuthConfig, Section, SftpLogin, redact_url
from router.config_types import Duration


class RetryConfig(Section):
    """A target's ``retry:``: in-place retries with exponential backoff and jitter."""

    attempts: int = Field(10, ge=1)
    initial: Duration = 0.5
    max: Duration = 60.0
    max_age: Duration = 1500.0
    """25 minutes: within RabbitMQ's default 30-minute consumer timeout (see ``_check_retry_fits``)."""


class BatchConfig(Section):
    """A target's ``batch:``: micro-batches for targets that accept arrays."""

    max_events: int = Field(100, ge=1, le=100_000)
    max_wait: Duration = 0.2


class XmlShape(Section):
    root: str = "events"
    element: str = "event"


class CircuitBreakerConfig(Section):
    """A target's ``circuit_breaker:``: pause after consecutive failures instead of hammering it."""

    failures: int = Field(5, ge=1)
    cooldown: Duration = 30.0


class TargetBase(Section):
    """What every target has: partitions, batching, retries, the payload's shape and format."""

    partitions: int = Field(8, ge=1, le=256)
    max_in_flight: int | None = Field(None, ge=1)
    batch: BatchConfig | None = None
    retry: RetryConfig = Field(default_factory=RetryConfig)
    timeout: Duration = Field(10.0, gt=0)
    accepts: list[Literal["delta", "absolute"]] | None = None
    body: dict[str, str] | None = None
    format: Literal["json", "xml", "csv"] = "json"
    xml: XmlShape | None = None
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)

    @property
    def in_flight_limit(self) -> int:
        """Requests in flight at once per process: ``max_in_flight``, by default one per partition."""
        return self.max_in_flight or self.partitions


class HttpTargetConfig(TargetBase):
    """``type: http``: an ERP, WMS or OMS API."""

    type: Literal["http"]
    url: str
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    auth: AuthConfig | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.match(r"https?://[^/\s]+", url):
            raise ValueError("expected an http:// or https:// URL")
        return url

    @property
    def location(self) -> str:
        return redact_url(self.url)


class _FileNaming(Section):
    """What the file and SFTP targets share: the ``filename`` pattern of the files they write."""

    filename: str = DEFAULT_FILENAME

    @field_validator("filename")
    @classmethod
    def _usable_pattern(cls, pattern: str) -> str:
        FilenamePattern(pattern)
        return pattern


class FileTargetConfig(TargetBase, _FileNaming):
    """``type: file``: each request's payload written as one file in a local (or mounted) folder."""

    type: Literal["file"]
    path: str = Field(min_length=1)

    @property
    def location(self) -> str:
        return self.path


class SftpTargetConfig(TargetBase, _FileNaming, SftpLogin):
    """``type: sftp``: each request's payload uploaded as one file to a folder on an SFTP server."""

    type: Literal["sftp"]
    remote_dir: str = Field(min_length=1)

    @property
    def location(self) -> str:
        return f"{self.address}{self.remote_dir}"


TargetConfig = Annotated[HttpTargetConfig | FileTargetConfig | SftpTargetConfig, Field(discriminator="type")]
