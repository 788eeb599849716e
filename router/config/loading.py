"""`load_config`: read, interpolate and validate routes.yaml, reporting every problem at once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationError

from ops.secrets import register_config_secrets
from router.config.checks import check_semantics
from router.config.model import RouterConfig
from router.config.problems import check_references, report_validation_error
from router.config_source import ConfigError, read_document


def load_config(path: Path, env: Mapping[str, str] | None = None) -> RouterConfig:
    """Read, interpolate and validate ``path``; raises ConfigError listing every problem found."""
    document = read_document(path, os.environ if env is None else env)
    # Known before anything is checked, so no message from here on can print one of them.
    register_config_secrets(document.data)
    if document.data is None and not document.problems:
        document.problem((), "the configuration is empty; start from the routes.yaml in the repository")
    elif document.data is not None and not isinstance(document.data, dict):
        document.problem((), "the configuration must be a mapping with version, targets and routes")
    if document.problems:
        raise ConfigError(document.problems)
    check_references(document)
    try:
        config = RouterConfig.model_validate(document.data)
    except ValidationError as error:
        for item in error.errors(include_url=False):
            report_validation_error(document, item)
        raise ConfigError(document.problems) from None
    config._path = path
    check_semantics(document, config)
    if document.problems:
        raise ConfigError(document.problems)
    return config
