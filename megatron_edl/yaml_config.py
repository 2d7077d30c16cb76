"""YAML run configs -> Megatron command-line flags (the same flags, nothing new).

A config groups flags by concern; keys are flag names without the leading ``--``::

    include: moe_8b_a0.8b.yaml      # optional: start from another config (path relative
                                    # to this file), then override group by group, key by key
    MODEL:
      num-layers: 24
      swiglu: true                  # true -> "--swiglu"; false or null -> flag left out
    MOE:
      num-experts: 96
    EDL:
      moe-edl-coeff: 0.01
    DATA:
      data-path: [0.5, /data/a, 0.5, /data/b]   # a list -> several values

String values may name environment variables as ``${NAME}`` (paths of the data, the run
directory); an unset variable is an error naming it. A value that is exactly one ``${NAME}``
expands to the shell words of that variable (``shlex.split``): ``DATA_PREFIX="0.5 /d/a 0.5 /d/b"``
gives ``--data-path`` four values, a blend, as ``--data-path $DATA_PREFIX`` would in a shell
script (quote a path with spaces inside the variable). Groups (``GROUPS``) mirror the bash arrays
of the Slurm scripts in ``examples/slurm``. Values must be scalars or lists of scalars. Order is
kept: groups in ``GROUPS`` order, keys in file order (an included key keeps its place when
overridden).

Command line: ``python -m megatron_edl.yaml_config CONFIG [--group NAME]`` prints the flags, one
per line (for ``mapfile -t ARRAY < <(...)`` in bash). The launcher also takes
``--config-yaml CONFIG``, expanded in place, so later flags override the file's.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from megatron_edl.config.run import CONFIG_FLAG
from megatron_edl.core.labels import load_strict_yaml

__all__ = ["GROUPS", "ConfigError", "expand_config_flag", "flags_from_yaml", "load_config"]

GROUPS = ("MODEL", "MOE", "EDL", "DATA", "PARALLEL", "TRAINING", "CHECKPOINT", "LOGGING")
_INCLUDE = "include"


class ConfigError(ValueError):
    """A YAML run config is malformed; the message names the file and the key."""


def load_config(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, dict]:
    """The config's groups after resolving ``include`` chains.

    Raises:
        ConfigError: Unknown group, bad value type, flag written with ``--``, include cycle.
        FileNotFoundError: The file (or an included one) does not exist.
    """
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"{path}: include cycle: {chain}")
    data = load_strict_yaml(path, what="run config") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config is a mapping of groups, got {type(data).__name__}")
    groups: dict[str, dict] = {}
    if _INCLUDE in data:
        included = data[_INCLUDE]
        if not isinstance(included, str):
            raise ConfigError(f"{path}: 'include' must be a file name, got {included!r}")
        groups = load_config(path.parent / included, (*_seen, path))
    for group, entries in data.items():
        if group == _INCLUDE:
            continue
        if group not in GROUPS:
            raise ConfigError(f"{path}: unknown group {group!r}; groups are {', '.join(GROUPS)}")
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ConfigError(f"{path}: group {group} must map flag names to values")
        merged = groups.setdefault(group, {})
        for key, value in entries.items():
            _check_entry(path, group, key, value)
            merged[key] = value
    return {g: groups[g] for g in GROUPS if g in groups}


def _check_entry(path: Path, group: str, key: Any, value: Any) -> None:
    where = f"{path}: {group}.{key}"
    if not isinstance(key, str) or not key or key.startswith("-") or " " in key:
        raise ConfigError(f"{where}: write flag names without dashes, e.g. 'num-layers'")
    scalars = (str, int, float, bool, type(None))
    if isinstance(value, list):
        if not value or not all(isinstance(v, scalars) and v is not None for v in value):
            raise ConfigError(f"{where}: a list value must hold scalars, got {value!r}")
    elif not isinstance(value, scalars):
        raise ConfigError(f"{where}: values are scalars or lists of scalars, got {value!r}")


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, where: str) -> str:
    def lookup(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"{where}: environment variable {name} is not set")
        return os.environ[name]

    return _VARIABLE.sub(lookup, str(value))


def _flags_of(entries: dict[str, Any], where: str) -> list[str]:
    flags: list[str] = []
    for key, value in entries.items():
        if value is None or value is False:
            continue
        flags.append(f"--{key}")
        if value is True:
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, str) and _VARIABLE.fullmatch(v):  # "${NAME}": the variable's words
                flags.extend(shlex.split(_expand(v, f"{where}: {key}")))
            else:
                flags.append(_expand(v, f"{where}: {key}"))
    return flags


def flags_from_yaml(path: str | os.PathLike, group: str | None = None) -> list[str]:
    """The command-line flags of a config (of one group when ``group`` is given)."""
    groups = load_config(path)
    if group is not None:
        if group not in GROUPS:
            raise ConfigError(f"unknown group {group!r}; groups are {', '.join(GROUPS)}")
        return _flags_of(groups.get(group, {}), f"{path}: {group}")
    return [flag for g, entries in groups.items() for flag in _flags_of(entries, f"{path}: {g}")]


def expand_config_flag(argv: list[str]) -> list[str]:
    """Replace every ``--config-yaml PATH`` in ``argv`` by the file's flags, in place."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == CONFIG_FLAG or arg.startswith(CONFIG_FLAG + "="):
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            else:
                raise ConfigError(f"{CONFIG_FLAG} needs a file name")
            out.extend(flags_from_yaml(value))
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("--group", choices=GROUPS, help="print only this group's flags")
    args = parser.parse_args(argv)
    try:
        flags = flags_from_yaml(args.config, args.group)
    except (ConfigError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    print("\n".join(flags))


if __name__ == "__main__":
    main()
