"""The routes.yaml contract as pydantic models, and `load_config`, which reports every problem at once.

`load_config` (:mod:`.loading`) reads the file with positions (:mod:`router.config_source`), validates
it against the models (:mod:`.sections` for the top-level blocks, :mod:`.targets`, :mod:`.sources`,
:mod:`.model` for routes and the whole file), then checks what the models alone cannot
(:mod:`.checks`): that `deliver` names defined targets, that lookup tables and payload schemas load,
that each route's mapping, record path and conditions compile, and that no route sends a target the
kind of quantity (delta or absolute) it refuses. Every problem is a :class:`ConfigProblem` at a line and
column (:mod:`.problems`); secrets are never echoed.
"""

from router.broker import redact_urls
from router.config.checks import read_json_schema
from router.config.common import AuthConfig, BasicAuth, SftpLogin, redact_url
from router.config.loading import load_config
from router.config.model import (
    CsvConfig,
    DeliverTo,
    FixedConfig,
    RouteConfig,
    RouterConfig,
    find_config_path,
)
from router.config.sections import ConsoleConfig, HttpConfig
from router.config.sources import (
    FileSourceConfig,
    RestSourceConfig,
    SftpSourceConfig,
    SourceConfig,
    WebhookSourceConfig,
)
from router.config.targets import FileTargetConfig, HttpTargetConfig, SftpTargetConfig, TargetConfig
from router.config_source import ConfigError, ConfigProblem

__all__ = [
    "AuthConfig",
    "BasicAuth",
    "ConfigError",
    "ConfigProblem",
    "ConsoleConfig",
    "CsvConfig",
    "DeliverTo",
    "FileSourceConfig",
    "FileTargetConfig",
    "FixedConfig",
    "HttpConfig",
    "HttpTargetConfig",
    "RestSourceConfig",
    "RouteConfig",
    "RouterConfig",
    "SftpLogin",
    "SftpSourceConfig",
    "SftpTargetConfig",
    "SourceConfig",
    "TargetConfig",
    "WebhookSourceConfig",
    "find_config_path",
    "load_config",
    "read_json_schema",
    "redact_url",
    "redact_urls",
]
