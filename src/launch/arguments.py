"""The launchers' arguments, their configuration and paths: every check before anything starts;
a problem is a LaunchError (one line, with the usage lines when an argument is wrong)."""
import os
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from src.config import Config

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(REPO_DIR, "default_config.yaml")
# The rank-table launcher trains on Ascend servers: its default is the COCO recipe, which names the
# data and the pretrained backbone (relative to the repository), so the table alone is a command.
RANK_TABLE_CONFIG = os.path.join(REPO_DIR, "configs", "coco_r50_1x.yaml")
TRAIN_PY = os.path.join(REPO_DIR, "train.py")
EVAL_PY = os.path.join(REPO_DIR, "eval.py")
# Configuration keys holding paths: resolved to absolute paths before they reach a rank.
PATH_KEYS = ("train_img_dir", "train_ann_file", "val_img_dir", "val_ann_file", "pretrained_backbone",
             "output_dir", "resume", "ckpt_file")
CONFIG_SUFFIXES = (".yaml", ".yml")
DEFAULT_CHECK_SECONDS = 10.0
DEFAULT_MASTER_PORT = 8118

USAGE = {
    "rank_table": [
        "Usage: bash scripts/run_distribute_train.sh [RANK_TABLE_FILE] [TRAIN_IMG_DIR] [TRAIN_ANN_FILE] "
        "[PRETRAINED_BACKBONE|none] [CONFIG_PATH] [--key=value ...]",
        "  only RANK_TABLE_FILE is required: the others default to the configuration (CONFIG_PATH, "
        "configs/coco_r50_1x.yaml unless given; a .yaml argument is taken for CONFIG_PATH wherever it stands)",
        "  launcher options: --server_id=N (or SERVER_ID: this server's position in server_list, or its "
        "server_id), --global_batch=G (or GLOBAL_BATCH: batch_size = G / RANK_SIZE), --dry_run, --wait (or "
        "LAUNCH_WAIT=1: stay in the foreground until every rank ends; the first that fails is reported and the "
        "others stopped)",
    ],
    "msrun": [
        "Usage: bash scripts/run_distribute_train_msrun.sh [DEVICE_TARGET GPU|CPU] [DEVICE_NUM] [TRAIN_IMG_DIR] "
        "[TRAIN_ANN_FILE] [OUTPUT_DIR] [PRETRAINED_BACKBONE|none] [CONFIG_PATH(optional)] [--key=value ...]",
        "  DEVICE_NUM: workers on this node; launcher options (or environment variables): "
        "--node_num=N (NODE_NUM, default 1), --node_rank=R (NODE_RANK, default 0), "
        "--master_addr=IP (MASTER_ADDR, node 0's address, required with several nodes), "
        f"--master_port=P (MASTER_PORT, default {DEFAULT_MASTER_PORT}), --global_batch=G (GLOBAL_BATCH), --dry_run",
    ],
    "eval": [
        "Usage: bash scripts/run_eval.sh [DEVICE_TARGET Ascend|GPU|CPU] [DEVICE_ID] [CKPT_FILE] [VAL_IMG_DIR] "
        "[VAL_ANN_FILE] [OUTPUT_DIR] [CONFIG_PATH] [--key=value ...]",
        "  VAL_IMG_DIR, VAL_ANN_FILE default to the configuration, OUTPUT_DIR to <output_dir of the "
        "configuration>/eval (console log: OUTPUT_DIR/log.txt); a .yaml argument is taken for CONFIG_PATH",
    ],
}


class LaunchError(Exception):
    """A problem to report in one line; ``usage`` adds the usage lines (a wrong or missing argument)."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def usage_error(message: str) -> LaunchError:
    return LaunchError(message, usage=True)



# ---------------------------------------------------------------- arguments and configuration

def split_args(args: Sequence[str], launcher_options: Sequence[str]) -> Tuple[List[str], Dict[str, str], List[str]]:
    """args -> (positionals, {launcher option: value}, [training --key=value flags]).

    Positionals come first; every later argument is --key=value. Options named in
    launcher_options (without the dashes; a bare --dry_run means True) are the launcher's."""
    positionals, options, flags = [], {}, []
    for arg in args:
        if not arg.startswith("--"):
            if options or flags:
                raise usage_error(f"'{arg}' after the --key=value arguments: positional arguments come first")
            positionals.append(arg)
            continue
        key, sep, value = arg[2:].partition("=")
        if key in launcher_options:
            options[key] = value if sep else "True"
        elif not sep:
            raise usage_error(f"'{arg}': extra arguments are --key=value")
        else:
            flags.append(arg)
    return positionals, options, flags


def assign_optional(values: Sequence[str], names: Sequence[str]) -> Dict[str, str]:
    """Optional positionals -> {name: value}: one ending in .yaml/.yml is CONFIG_PATH wherever it
    stands, the others fill ``names`` (which ends with CONFIG_PATH) in order."""
    named = {}
    rest = []
    for value in values:
        if value.lower().endswith(CONFIG_SUFFIXES) and "CONFIG_PATH" not in named:
            named["CONFIG_PATH"] = value
        else:
            rest.append(value)
    slots = [n for n in names if n not in named]
    if len(rest) > len(slots):
        raise usage_error(f"too many arguments: {' '.join(rest[len(slots):])}")
    named.update(zip(slots, rest))
    return named


def absolute(path: str, base: str) -> str:
    """Absolute form of path (~ expanded), relative ones against base; '' stays ''."""
    if not path:
        return path
    path = os.path.expanduser(path)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def option(options: Mapping[str, str], name: str, env_name: Optional[str],
           default: Optional[str] = None) -> Optional[str]:
    """A launcher option from the command line, else the environment, else default."""
    if name in options:
        return options[name]
    return os.environ.get(env_name, default) if env_name else default


def integer(name: str, text: object, minimum: int) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise usage_error(f"{name} must be an integer >= {minimum}: {text}")
    return value


def load_run_config(config_path: str, flags: Sequence[str]) -> "Config":
    """The configuration train.py/eval.py will see (default_config.yaml + config_path + flags);
    its problems (unknown key, wrong type or choice) as LaunchError."""
    from src.config import ConfigError, load_config

    try:
        return load_config([f"--config_path={config_path}", *flags])
    except ConfigError as err:
        raise usage_error(str(err)) from None


def resolved_paths(cfg: "Config", flags: Sequence[str], cwd: str) -> Dict[str, str]:
    """{path key: absolute path} as a rank must get it: given as a flag -> relative to the caller's
    folder; from the configuration -> relative to the repository root."""
    given = {arg[2:].split("=", 1)[0] for arg in flags}
    return {key: absolute(cfg[key], cwd if key in given else REPO_DIR) for key in PATH_KEYS}


def without_path_flags(flags: Sequence[str]) -> List[str]:
    return [arg for arg in flags if arg[2:].split("=", 1)[0] not in PATH_KEYS]


def need_file(name: str, path: str, source: str = "") -> None:
    if not os.path.isfile(path):
        raise usage_error(f"{name}{source} is not a file: {path}")


def need_dir(name: str, path: str, source: str = "") -> None:
    if not os.path.isdir(path):
        raise usage_error(f"{name}{source} is not a folder: {path}")


def pick_path(named: Mapping[str, str], name: str, key: str, cfg_paths: Mapping[str, str], config_path: str, cwd: str,
              kind: str) -> str:
    """The path of argument ``name`` (relative to cwd) or, when not given, configuration key
    ``key``; checked to be a file ('file') or folder ('dir')."""
    if name in named:
        path, source = absolute(named[name], cwd), ""
    else:
        path, source = cfg_paths[key], f" ({key} of {config_path})"
        if not path:
            raise usage_error(f"{name} not given and {key} is empty in {config_path}")
    (need_file if kind == "file" else need_dir)(name, path, source)
    return path


def refuse_duplicates(named: Mapping[str, str], flags: Sequence[str], names: Mapping[str, str]) -> None:
    """An argument given both as a positional (named) and as a --key=value flag is a mistake."""
    given = {arg[2:].split("=", 1)[0] for arg in flags}
    for name, key in names.items():
        if name in named and key in given:
            raise usage_error(f"{name} and --{key} both given: give one")


def run_config(named: Dict[str, str], flags: List[str], default_config: str,
               cwd: str) -> Tuple[str, "Config", Dict[str, str]]:
    """CONFIG_PATH (an argument, --config_path=, or default_config) checked and loaded with the
    flags -> (config path, Config, its path keys resolved to absolute paths)."""
    take_config_flag(named, flags)
    config_path = absolute(named.get("CONFIG_PATH", default_config), cwd)
    need_file("CONFIG_PATH", config_path)
    cfg = load_run_config(config_path, flags)
    return config_path, cfg, resolved_paths(cfg, flags, cwd)


def take_config_flag(named: Dict[str, str], flags: List[str]) -> None:
    """--config_path=PATH among the extra flags counts as the CONFIG_PATH argument."""
    for arg in list(flags):
        if arg.startswith("--config_path="):
            named["CONFIG_PATH"] = arg.split("=", 1)[1]
            flags.remove(arg)


def pretrained_flags(named: Mapping[str, str], cfg: "Config", cfg_paths: Mapping[str, str], config_path: str,
                     cwd: str) -> Tuple[List[str], Optional[str]]:
    """--pretrained/--pretrained_backbone for the PRETRAINED_BACKBONE argument (a .ckpt or
    'none') or, when not given, the configuration's."""
    value = named.get("PRETRAINED_BACKBONE")
    if value == "none" or (value is None and not cfg.pretrained):
        return ["--pretrained=False"], None
    path = pick_path(named, "PRETRAINED_BACKBONE", "pretrained_backbone", cfg_paths, config_path, cwd, "file")
    return ["--pretrained=True", f"--pretrained_backbone={path}"], path


def batch_flags(options: Mapping[str, str], flags: Sequence[str], cfg: "Config",
                world_size: int) -> Tuple[List[str], int, int]:
    """--batch_size for --global_batch / GLOBAL_BATCH (which world_size devices must split)
    -> (flags, per-device batch, global batch)."""
    text = option(options, "global_batch", "GLOBAL_BATCH", "")
    if not text:
        return [], cfg.batch_size, cfg.batch_size * world_size
    global_batch = integer("the global batch (--global_batch / GLOBAL_BATCH)", text, 1)
    if any(arg.startswith("--batch_size=") for arg in flags):
        raise usage_error("give --global_batch or --batch_size, not both")
    if global_batch % world_size:
        raise LaunchError(f"the global batch {global_batch} cannot be split over {world_size} devices "
                          f"({global_batch} / {world_size} is not a whole number of images per device)")
    per_device = global_batch // world_size
    return [f"--batch_size={per_device}"], per_device, global_batch


def schedule_line(cfg: "Config", per_device: int, world_size: int) -> str:
    """What the device count does to the schedule, in one line."""
    from src.engine.lr_schedule import scaled_lr

    global_batch = per_device * world_size
    lr = scaled_lr(cfg.base_lr, cfg.lr_base_batch, global_batch)
    return (f"schedule: batch {per_device} per device x {world_size} devices = global batch {global_batch}, "
            f"lr {cfg.base_lr:g} x {global_batch}/{cfg.lr_base_batch} = {lr:g}, {cfg.epochs} epochs of "
            f"(training images / {global_batch}) steps, warmup {cfg.warmup_iters} steps")
