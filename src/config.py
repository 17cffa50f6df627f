"""Configuration: default_config.yaml (+ an optional --config_path YAML) + command-line overrides.

default_config.yaml is the one schema of every key, in five YAML documents: values, help strings,
allowed choices, ranges ("> 0", ">= 0", "[0, 1]", "(0, 1]", ...; a list value must be non-empty
with every element in range) and groups (named key lists: run_only keys never reach a compiled
graph, benchmark keys define what a benchmark measured). Every value key becomes a command-line
flag ``--key=value`` whose type follows the default value (bool, int, float, str, list). Entry
points declare their own flags (Flag) through the same loader. Any problem - unknown key, wrong
type, choice not allowed, value out of range, missing file - is reported as one line naming the
key, and the program exits with code 2 (see ``guard_main``).
"""
import argparse
import ast
import dataclasses
import functools
import os
import re
import sys
from typing import Any, Callable, Dict, NoReturn, Optional, Sequence, Tuple

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "default_config.yaml")


class ConfigError(ValueError):
    """A configuration or command-line problem a user must fix; the message is one line."""


class Config(dict):
    """A dict with attribute access (``cfg.batch_size``)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key '{key}'") from None

    def __setattr__(self, key, value):
        self[key] = value

    def __repr__(self):
        return "\n".join(f"{k}: {v!r}" for k, v in sorted(self.items()))


def _read_yaml(path):
    """path -> (values, helps, choices, ranges, groups) dicts."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config_path: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d or {} for d in yaml.safe_load_all(f)]
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"--config_path: {path} is not valid YAML: {first}") from None
    docs += [{}] * (5 - len(docs))
    if not all(isinstance(d, dict) for d in docs[:5]):
        raise ConfigError(f"--config_path: {path} must hold mappings (values, helps, choices, ranges, groups)")
    return tuple(docs[:5])


_INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*([\])])$")
_BOUND = re.compile(r"^(>=|>)\s*(-?[\d.]+)$")


def range_test(text: Any) -> Callable[[float], bool]:
    """A range of the schema ("> 0", ">= 0", "[0, 1)", ...) -> predicate on a number."""
    text = str(text).strip()
    bound = _BOUND.match(text)
    if bound:
        op, low = bound.group(1), float(bound.group(2))
        return (lambda v: v >= low) if op == ">=" else (lambda v: v > low)
    interval = _INTERVAL.match(text)
    if not interval:
        raise ValueError(f"not a range: '{text}' (write > a, >= a or an interval like [a, b))")
    left, low, high, right = interval.group(1), float(interval.group(2)), float(interval.group(3)), interval.group(4)
    return lambda v: (v >= low if left == "[" else v > low) and (v <= high if right == "]" else v < high)


@dataclasses.dataclass(frozen=True)
class Schema:
    """default_config.yaml's five documents."""
    values: dict
    helps: dict
    choices: dict
    ranges: dict
    groups: dict

    def group(self, name: str) -> Tuple[str, ...]:
        """The keys of a group (run_only, benchmark, ...) in file order."""
        return tuple(self.groups[name])


@functools.lru_cache(maxsize=None)
def schema() -> Schema:
    """The schema of default_config.yaml; ConfigError where its ranges or groups name unknown keys."""
    values, helps, choices, ranges, groups = _read_yaml(DEFAULT_CONFIG)
    named = list(ranges) + [key for keys in groups.values() for key in keys]
    unknown = [key for key in named if key not in values]
    if unknown:
        raise ConfigError(f"{DEFAULT_CONFIG}: ranges or groups name unknown keys {unknown}")
    for key, text in ranges.items():
        try:
            range_test(text)
        except ValueError as err:
            raise ConfigError(f"{DEFAULT_CONFIG}: {key}: {err}") from None
    return Schema(values, helps, choices, ranges, groups)


def _check_range(key, value, text):
    test = range_test(text)
    if isinstance(value, list):
        if not value or not all(test(v) for v in value):
            raise ConfigError(f"--{key}={value}: must be a non-empty list of values {text}")
    elif not test(value):
        word = "" if text[0] in "<>" else "in "
        raise ConfigError(f"--{key}={value}: must be {word}{text}")


@dataclasses.dataclass(frozen=True)
class Flag:
    """A flag of one entry point beside the configuration keys (e.g. preprocess.py --export_info).

    Its type follows the default as for configuration keys; ``many`` takes one or more values
    (``--input a.jpg b.jpg``) as a list of strings; ``required`` makes an empty value an error.
    """
    default: object
    help: str
    many: bool = False
    required: bool = False


def _parse_bool(text):
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise ValueError(f"expected True or False, got '{text}'")


def _parse_list(text):
    text = text.strip()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = yaml.safe_load(text)
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        value = [value]
    return value


def _coerce(key, value, default):
    """Convert ``value`` (a CLI string or a YAML value) to the type of ``default``."""
    try:
        if isinstance(default, bool):
            return value if isinstance(value, bool) else _parse_bool(value)
        if isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got '{value}'")
            try:
                return int(str(value).strip()) if isinstance(value, str) else int(value)
            except ValueError:
                raise ValueError(f"expected an integer, got '{value}'") from None
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got '{value}'")
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"expected a number, got '{value}'") from None
        if isinstance(default, list):
            items = _parse_list(value) if isinstance(value, str) else value
            if not isinstance(items, list):
                raise ValueError(f"expected a list, got '{value}'")
            return [_coerce_item(key, item, default) for item in items]
        if default is None or isinstance(default, str):
            return "" if value is None else str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--{key}: {err}") from None
    raise ConfigError(f"--{key}: unsupported default type {type(default).__name__}")


def _coerce_item(key, item, default):
    """List elements follow the type of the default's elements (when it has any)."""
    if not default:
        return item
    proto = default[0]
    if isinstance(proto, list):
        if not isinstance(item, (list, tuple)):
            raise ValueError(f"expected a list of lists, got element '{item}'")
        return [_coerce_item(key, x, proto) for x in item]
    if isinstance(proto, float) and isinstance(item, int) and not isinstance(item, bool):
        return float(item)
    if isinstance(proto, int) and not isinstance(proto, bool):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or float(item) != int(item):
            raise ValueError(f"expected integers, got element '{item}'")
        return int(item)
    if isinstance(proto, float) and not isinstance(item, float):
        raise ValueError(f"expected numbers, got element '{item}'")
    return item


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _build_parser(values, helps, choices, description, flags):
    parser = _OneLineParser(description=description, allow_abbrev=False,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config_path", default=DEFAULT_CONFIG, help="YAML configuration file.")
    for key, flag in flags.items():
        parser.add_argument(f"--{key}", nargs="+" if flag.many else None, default=None,
                            help=f"{flag.help} (default: {flag.default!r})")
    for key, default in values.items():
        text = helps.get(key, "")
        if key in choices:
            text = f"{text} Choices: {choices[key]}."
        parser.add_argument(f"--{key}", type=str, default=None, metavar=type(default).__name__.upper(),
                            help=f"{text} (default: {default!r})")
    return parser


def load_config(argv: Optional[Sequence[str]] = None, description: str = "FCOS",
                flags: Optional[Dict[str, Flag]] = None) -> Config:
    """Parse ``argv`` (default ``sys.argv[1:]``) into a Config; raises ConfigError.

    flags: {name: Flag} of the entry point's own flags; they land in the Config under their names.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = flags or {}
    base = schema()
    values, helps, choices = base.values, base.helps, base.choices
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config_path", default=DEFAULT_CONFIG)
    config_path = pre.parse_known_args(argv)[0].config_path
    if os.path.abspath(config_path) != DEFAULT_CONFIG:
        user_values, user_helps, user_choices, user_ranges, _ = _read_yaml(config_path)
        for key in user_values:
            if key not in values:
                raise ConfigError(f"{key}: unknown key in {config_path}")
        # the schema's choices and ranges hold for every run: a user file cannot widen them
        changed = [key for key, allowed in user_choices.items() if base.choices.get(key) != allowed]
        changed += [key for key, text in user_ranges.items() if base.ranges.get(key) != text]
        if changed:
            raise ConfigError(f"{config_path}: the allowed choices or ranges of {changed[0]} are default_config.yaml's "
                              "and cannot be changed by a configuration file")
        values = {**values, **{k: _coerce(k, v, values[k]) for k, v in user_values.items()}}
        helps = {**helps, **user_helps}

    parser = _build_parser(values, helps, choices, description, flags)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=", 1)[0]
        raise ConfigError(f"{flag}: unknown option (see --help for the list)")
    cfg = Config(values)
    for key, default in values.items():
        raw = getattr(args, key)
        if raw is not None:
            cfg[key] = _coerce(key, raw, default)
    cfg.config_path = os.path.abspath(config_path)
    for key, allowed in choices.items():
        if key in cfg and cfg[key] not in allowed:
            raise ConfigError(f"--{key}: '{cfg[key]}' is not one of {allowed}")
    for key, text in base.ranges.items():
        _check_range(key, cfg[key], text)
    for key, flag in flags.items():
        raw = getattr(args, key)
        cfg[key] = flag.default if raw is None else (list(raw) if flag.many else _coerce(key, raw, flag.default))
        if flag.required and not cfg[key]:
            raise ConfigError(f"--{key}: required, but empty")
    return cfg


def require_files(cfg: Config, *keys: str) -> None:
    """Raise ConfigError for the first key whose path is empty or missing."""
    for key in keys:
        path = cfg[key]
        if not path:
            raise ConfigError(f"--{key}: required, but empty")
        if not os.path.exists(path):
            raise ConfigError(f"--{key}: no such file or folder: {path}")


def guard_main(main: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``main`` so that a ConfigError ends the program with one line and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper

