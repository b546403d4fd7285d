"""The command line shared by every entry script: `--config FILE` plus dotted `key.path=value` overrides.

`--config vith.yaml` or `--config vith` finds `configs/vith.yaml` of this repository when no such file exists in
the working directory, so the command users type works from anywhere (and inside `ray job submit`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from cluster.root_config import RootConfig, load_config
from training.config_loader import ConfigError

CONFIG_ERROR_EXIT = 2
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line (`prog: error: ... (see --help)`) and exit 2."""

    def error(self, message: str):
        self.exit(CONFIG_ERROR_EXIT, f"{self.prog}: error: {message} (see --help)\n")


def available_configs() -> list[str]:
    """The names of the shipped configs (`configs/*.yaml`)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def find_config(name: str) -> Path:
    """The config file `name` means: a path that exists, else `configs/<name>` or `configs/<name>.yaml`.

    Raises:
        ConfigError: nothing matches; the message lists the shipped configs.
    """
    given = Path(name).expanduser()
    if given.is_file():
        return given
    if given.parent == Path("."):  # a bare name, not a path that happens to be missing
        for candidate in (CONFIG_DIR / given.name, CONFIG_DIR / f"{given.name}.yaml"):
            if candidate.is_file():
                return candidate
    raise ConfigError(
        f"config file not found: {name}; shipped configs ({CONFIG_DIR}): {', '.join(available_configs())}"
    )


def parse_config_args(
    argv: Sequence[str] | None,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    default_config: str | None = None,
) -> tuple[argparse.Namespace, RootConfig]:
    """Parse `--config FILE [flags] [key.path=value ...]` and load the validated config.

    `default_config` makes `--config` optional (a command that reads its own configs).

    Raises:
        ConfigError: the config is unusable; callers exit with CONFIG_ERROR_EXIT before starting anything.
    """
    parser = ArgumentParser(description=description)
    parser.add_argument(
        "--config",
        required=default_config is None,
        default=default_config,
        help=f"YAML config file, or the name of a shipped one ({', '.join(available_configs())})",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-5 cluster.num_workers=4")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    args.config = str(find_config(args.config))
    return args, load_config(args.config, args.overrides)


__all__ = [
    "ArgumentParser",
    "CONFIG_ERROR_EXIT",
    "ConfigError",
    "available_configs",
    "find_config",
    "parse_config_args",
]
