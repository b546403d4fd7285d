"""Loading a config schema: `OmegaConf.structured(schema)` <- YAML file <- dotted CLI overrides, then every section's
`__post_init__` checks.

The sections live next to the code they configure (`training.model.config`, `shards.config`, ...); the root schema
that composes them is `cluster.root_config.RootConfig`. Any problem raises `ConfigError`, whose message names the key
path and the file; entry scripts turn it into exit code 2 before anything starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from training.errors import PermanentError

Schema = TypeVar("Schema")


class ConfigError(PermanentError, ValueError):
    """A config that must not start a job. The message names the key path and the file."""


def _describe(error: OmegaConfBaseException, prefix: str, renamed: Mapping[str, str]) -> str:
    key = getattr(error, "full_key", None) or ""
    if prefix and not key.startswith(prefix):
        key = f"{prefix}.{key}" if key else prefix
    message = str(error).split("\n")[0]
    if key in renamed:
        message += f" ({key} is now {renamed[key]})"
    return f"{key}: {message}" if key else message


def _read_yaml(path: str | Path) -> DictConfig:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        loaded = OmegaConf.load(file)
    except Exception as error:  # a YAML syntax error names line and column
        raise ConfigError(f"{file}: not valid YAML: {error}") from error
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{file}: the top level must be a mapping of sections")
    return loaded


def load_structured(
    schema: type[Schema],
    path: str | Path | None,
    overrides: Sequence[str] = (),
    renamed: Mapping[str, str] | None = None,
) -> Schema:
    """Build a validated config: schema defaults <- YAML file <- dotted overrides.

    Args:
        schema: the dataclass to build (the root schema, or one section).
        path: YAML file, or None for the schema defaults alone.
        overrides: `key.path=value` strings, applied last.
        renamed: old key path -> new one; an unknown key found here gets the new name in its message.

    Returns:
        An instance of `schema`, every check passed.

    Raises:
        ConfigError: unknown key, wrong type, missing required value or a cross-field violation; the message
            names the key path and the file.
    """
    renamed = renamed or {}
    where = str(path) if path is not None else "<defaults>"
    merged = OmegaConf.structured(schema)
    if path is not None:
        # Merge section by section so that an error inside a list of sources still names its section.
        for section, value in _read_yaml(path).items():
            try:
                merged = OmegaConf.merge(merged, {section: value})
            except OmegaConfBaseException as error:
                raise ConfigError(f"{where}: {_describe(error, str(section), renamed)}") from error
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must read key.path=value")
        key, _, raw_value = override.partition("=")
        try:
            # `OmegaConf.update` walks list indices (`data.sources.0.path=...`), which a merged dotlist cannot.
            value = OmegaConf.from_dotlist([f"value={raw_value}"])["value"]
            OmegaConf.update(merged, key.strip(), value, merge=True, force_add=False)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{where} (override {override!r}): {_describe(error, '', renamed)}") from error
        except (TypeError, IndexError, KeyError, ValueError) as error:
            raise ConfigError(f"{where} (override {override!r}): {key}: {error}") from error
    return _instantiate(merged, schema, where, renamed)


def _instantiate(merged: DictConfig, schema: type[Schema], where: str, renamed: Mapping[str, str]) -> Schema:
    """The dataclasses of a merged config; every `__post_init__` check runs here."""
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{where}: missing required value(s): {', '.join(missing)}")
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}: {_describe(error, '', renamed)}") from error
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from error
    assert isinstance(config, schema)
    return config


def load_section(path: str | Path, section: str, schema: type[Schema]) -> Schema:
    """One section of a saved config (a checkpoint's `config.yaml`), validated against its own schema alone.

    Reading only the section a job needs keeps old checkpoints readable after other sections change.

    Raises:
        ConfigError: the file or section is missing or does not fit `schema`.
    """
    loaded = _read_yaml(path)
    if section not in loaded:
        raise ConfigError(f"{path}: no `{section}` section")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), loaded[section])
    except OmegaConfBaseException as error:
        raise ConfigError(f"{path}: {_describe(error, section, {})}") from error
    return _instantiate(merged, schema, f"{path} [{section}]", {})


def read_container(path: str | Path) -> dict[str, Any]:
    """A YAML config file as plain dicts and lists, unvalidated (a saved config, shown in results)."""
    container = OmegaConf.to_container(_read_yaml(path), resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def to_yaml(config: Any) -> str:
    """A config dataclass as YAML: the resolved config saved with every checkpoint and eval result."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_container(config: Any) -> dict[str, Any]:
    """A config dataclass as plain dicts and lists (JSON-ready)."""
    container = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]
