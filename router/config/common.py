"""What every block of routes.yaml builds on: strict sections, names, logins and JMESPath."""

from __future__ import annotations

import re
from typing import Annotated

import jmespath
from jmespath.exceptions import JMESPathError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ops.secrets import redact

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class Section(BaseModel):
    """A block of routes.yaml: unknown keys are refused, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class BasicAuth(Section):
    username: str
    password: str = Field(repr=False)


class AuthConfig(Section):
    """``auth:``: a bearer token or basic credentials, from the environment; empty means none."""

    bearer: str | None = Field(None, repr=False)
    basic: BasicAuth | None = None

    @field_validator("bearer")
    @classmethod
    def _empty_is_none(cls, token: str | None) -> str | None:
        return token or None

    @model_validator(mode="after")
    def _one_scheme(self) -> AuthConfig:
        if self.bearer and self.basic:
            raise ValueError("auth has both bearer and basic; give one")
        return self

    def credentials(self) -> tuple[str | None, tuple[str, str] | None]:
        """(bearer token, (user, password)); either may be None."""
        basic = (self.basic.username, self.basic.password) if self.basic else None
        return self.bearer, basic


class SftpLogin(Section):
    """How to reach an SFTP server: the host key pinned in ``known_hosts``, a key or password login."""

    host: str = Field(min_length=1)
    port: int = Field(22, ge=1, le=65535)
    username: str = Field(min_length=1)
    key_file: str | None = None
    key_passphrase: str | None = Field(None, repr=False)
    password: str | None = Field(None, repr=False)
    known_hosts: str

    @model_validator(mode="after")
    def _can_log_in(self) -> SftpLogin:
        if not self.key_file and not self.password:
            raise ValueError("give key_file or password (from the environment) to log in")
        return self

    @property
    def address(self) -> str:
        return f"sftp://{self.username}@{self.host}:{self.port}"


def _jmespath(expression: str | None) -> str | None:
    """Refuse an expression that does not compile as JMESPath."""
    if expression is not None:
        try:
            jmespath.compile(expression)
        except JMESPathError as error:
            reason = " ".join(str(error).split())
            raise ValueError(f"{expression!r} is not valid JMESPath: {reason}") from None
    return expression


JmesPath = Annotated[str, AfterValidator(_jmespath)]


def redact_url(url: str) -> str:
    """A URL fit to print: its password masked."""
    return redact(url)
