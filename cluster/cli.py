"""The command line shared by every entry script: `--config FILE` plus dotted `key.path=value` overrides."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from training.config_loader import ConfigError, RootConfig, load_config

CONFIG_ERROR_EXIT = 2


def parse_config_args(
    argv: Sequence[str] | None,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[argparse.Namespace, RootConfig]:
    """Parse `--config FILE [flags] [key.path=value ...]` and load the validated config.

    Raises:
        ConfigError: the config is unusable; callers exit with CONFIG_ERROR_EXIT before starting anything.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file (configs/tiny.yaml, configs/vith.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-5 cluster.num_workers=4")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    return args, load_config(args.config, args.overrides)


__all__ = ["CONFIG_ERROR_EXIT", "ConfigError", "parse_config_args"]
