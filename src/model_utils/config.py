"""Configuration: default_config.yaml (+ an optional --config_path YAML) + command-line overrides.

The YAML holds three documents: values, help strings, allowed choices. Every value key becomes a
command-line flag ``--key=value`` whose type follows the default value (bool, int, float, str,
list). Any problem - unknown key, wrong type, choice not allowed, missing file - is reported as
one line naming the key, and the program exits with code 2 (see ``guard_main``).
"""
import argparse
import ast
import functools
import os
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(ROOT, "default_config.yaml")


class ConfigError(ValueError):
    """A configuration or command-line problem a user must fix; the message is one line."""


_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
# Values outside these would fail deep inside numpy or MindSpore with a traceback, or quietly do
# something else; the check names the key instead.
VALUE_RULES = {
    "min_size": (lambda v: len(v) > 0 and all(s > 0 for s in v), "a non-empty list of sizes > 0"),
    "max_size": _POSITIVE, "size_divisor": _POSITIVE, "max_gt_boxes": _POSITIVE,
    "flip_prob": _FRACTION, "color_jitter": _NON_NEGATIVE, "crop_prob": _FRACTION,
    "crop_min_scale": (lambda v: 0 < v <= 1, "in (0, 1]"), "rotate_degrees": _NON_NEGATIVE,
    "num_parallel_workers": _POSITIVE, "fpn_out_channels": _POSITIVE, "class_num": _POSITIVE,
    "num_head_convs": _NON_NEGATIVE, "prior": (lambda v: 0 < v < 1, "in (0, 1)"),
    "center_sampling_radius": _NON_NEGATIVE, "focal_alpha": _FRACTION, "focal_gamma": _NON_NEGATIVE,
    "score_threshold": _FRACTION, "nms_iou_threshold": _FRACTION, "max_detection_boxes_num": _POSITIVE,
    "detections_per_img": _POSITIVE, "batch_size": _POSITIVE, "epochs": _POSITIVE, "base_lr": _NON_NEGATIVE,
    "lr_base_batch": _POSITIVE, "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": _NON_NEGATIVE, "lr_gamma": _POSITIVE, "warmup_iters": _NON_NEGATIVE,
    "warmup_ratio": _FRACTION, "grad_clip_norm": _NON_NEGATIVE, "max_bad_steps": _POSITIVE,
    "save_ckpt_epochs": _NON_NEGATIVE, "save_ckpt_steps": _NON_NEGATIVE, "keep_ckpt_max": _POSITIVE,
    "log_interval": _POSITIVE, "eval_interval": _NON_NEGATIVE,
}


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
    """path -> (values, helps, choices) dicts."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config_path: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d or {} for d in yaml.safe_load_all(f)]
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"--config_path: {path} is not valid YAML: {first}") from None
    docs += [{}] * (3 - len(docs))
    if not all(isinstance(d, dict) for d in docs[:3]):
        raise ConfigError(f"--config_path: {path} must hold mappings (values, helps, choices)")
    return docs[0], docs[1], docs[2]


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
    def error(self, message):
        raise ConfigError(message)


def _build_parser(values, helps, choices, description):
    parser = _OneLineParser(description=description, allow_abbrev=False,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config_path", default=DEFAULT_CONFIG, help="YAML configuration file.")
    for key, default in values.items():
        text = helps.get(key, "")
        if key in choices:
            text = f"{text} Choices: {choices[key]}."
        parser.add_argument(f"--{key}", type=str, default=None, metavar=type(default).__name__.upper(),
                            help=f"{text} (default: {default!r})")
    return parser


def load_config(argv=None, description="FCOS"):
    """Parse ``argv`` (default ``sys.argv[1:]``) into a Config; raises ConfigError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values, helps, choices = _read_yaml(DEFAULT_CONFIG)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config_path", default=DEFAULT_CONFIG)
    config_path = pre.parse_known_args(argv)[0].config_path
    if os.path.abspath(config_path) != DEFAULT_CONFIG:
        user_values, user_helps, user_choices = _read_yaml(config_path)
        for key in user_values:
            if key not in values:
                raise ConfigError(f"{key}: unknown key in {config_path}")
        values = {**values, **{k: _coerce(k, v, values[k]) for k, v in user_values.items()}}
        helps, choices = {**helps, **user_helps}, {**choices, **user_choices}

    parser = _build_parser(values, helps, choices, description)
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
    for key, (test, text) in VALUE_RULES.items():
        if key in cfg and not test(cfg[key]):
            raise ConfigError(f"--{key}={cfg[key]}: must be {text}")
    return cfg


def require_files(cfg, *keys):
    """Raise ConfigError for the first key whose path is empty or missing."""
    for key in keys:
        path = cfg[key]
        if not path:
            raise ConfigError(f"--{key}: required, but empty")
        if not os.path.exists(path):
            raise ConfigError(f"--{key}: no such file or folder: {path}")


def guard_main(main):
    """Run ``main`` so that a ConfigError ends the program with one line and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper

