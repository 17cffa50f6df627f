"""Launch planning and process start for the shell launchers (they only call this module).

    python -m src.engine.launch rank_table ARGS...   scripts/run_distribute_train.sh (Ascend, rank table)
    python -m src.engine.launch msrun ARGS...        scripts/run_distribute_train_msrun.sh (GPU/CPU, msrun)
    python -m src.engine.launch eval ARGS...         scripts/run_eval.sh

Every argument, the configuration and the rank table are checked before anything is created or
started; a problem is one line ``error: ...`` on stdout and exit code 1 (with the usage lines
when an argument is missing or wrong).

Paths given on the command line are relative to the caller's folder; relative paths inside a
configuration file are relative to the repository root (where the other launchers run
train.py). Ranks get absolute paths.

rank_table: the table's servers, devices and rank ids are read and checked (rank ids 0..N-1,
each once; device ids unique per server); this server is the one SERVER_ID names (a position
in server_list or a server_id of the table, as --server_id= or environment variable), else the
only server of the table, else the one whose server_id is an address of this machine. Its
devices start as one process each, in the background, with RANK_TABLE_FILE, RANK_SIZE (devices
of the whole table), DEVICE_NUM (devices of this server), RANK_ID and DEVICE_ID from the table,
in <output_dir>/train_parallel<RANK_ID>/ (log.txt, env.log), each bound to its share of the CPUs
this process may use. The launcher then watches them for LAUNCH_CHECK_SECONDS (default 10): a
rank that could not be started or exits with an error in that time stops the others it started
and the launcher fails; with --wait (LAUNCH_WAIT=1) it watches until every rank has ended and
reports the first that fails. Ctrl-C or SIGTERM while it watches stops every rank it started. A
rank folder of an earlier launch is kept under train_parallel<RANK_ID>.<its time>, never deleted;
one whose rank still runs is refused. env.log holds the variables a rerun needs, secrets redacted,
readable by its owner only. FCOS_TRAIN_COMMAND replaces ``<python> <repo>/train.py`` (the command
each rank runs, split like a shell line; the training flags follow it), e.g. to wrap it in a
profiler or to start a stand-in process in tests.
"""
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

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

    def __init__(self, message, usage=False):
        super().__init__(message)
        self.usage = usage


def usage_error(message):
    return LaunchError(message, usage=True)


# ---------------------------------------------------------------- arguments and configuration

def split_args(args, launcher_options):
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


def assign_optional(values, names):
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


def absolute(path, base):
    """Absolute form of path (~ expanded), relative ones against base; '' stays ''."""
    if not path:
        return path
    path = os.path.expanduser(path)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def option(options, name, env_name, default=None):
    """A launcher option from the command line, else the environment, else default."""
    if name in options:
        return options[name]
    return os.environ.get(env_name, default) if env_name else default


def integer(name, text, minimum):
    try:
        value = int(str(text).strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise usage_error(f"{name} must be an integer >= {minimum}: {text}")
    return value


def load_run_config(config_path, flags):
    """The configuration train.py/eval.py will see (default_config.yaml + config_path + flags);
    its problems (unknown key, wrong type or choice) as LaunchError."""
    from src.model_utils.config import ConfigError, load_config

    try:
        return load_config([f"--config_path={config_path}", *flags])
    except ConfigError as err:
        raise usage_error(str(err)) from None


def resolved_paths(cfg, flags, cwd):
    """{path key: absolute path} as a rank must get it: given as a flag -> relative to the caller's
    folder; from the configuration -> relative to the repository root."""
    given = {arg[2:].split("=", 1)[0] for arg in flags}
    return {key: absolute(cfg[key], cwd if key in given else REPO_DIR) for key in PATH_KEYS}


def without_path_flags(flags):
    return [arg for arg in flags if arg[2:].split("=", 1)[0] not in PATH_KEYS]


def need_file(name, path, source=""):
    if not os.path.isfile(path):
        raise usage_error(f"{name}{source} is not a file: {path}")


def need_dir(name, path, source=""):
    if not os.path.isdir(path):
        raise usage_error(f"{name}{source} is not a folder: {path}")


def pick_path(named, name, key, cfg_paths, config_path, cwd, kind):
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


def refuse_duplicates(named, flags, names):
    """An argument given both as a positional (named) and as a --key=value flag is a mistake."""
    given = {arg[2:].split("=", 1)[0] for arg in flags}
    for name, key in names.items():
        if name in named and key in given:
            raise usage_error(f"{name} and --{key} both given: give one")


def run_config(named, flags, default_config, cwd):
    """CONFIG_PATH (an argument, --config_path=, or default_config) checked and loaded with the
    flags -> (config path, Config, its path keys resolved to absolute paths)."""
    take_config_flag(named, flags)
    config_path = absolute(named.get("CONFIG_PATH", default_config), cwd)
    need_file("CONFIG_PATH", config_path)
    cfg = load_run_config(config_path, flags)
    return config_path, cfg, resolved_paths(cfg, flags, cwd)


def take_config_flag(named, flags):
    """--config_path=PATH among the extra flags counts as the CONFIG_PATH argument."""
    for arg in list(flags):
        if arg.startswith("--config_path="):
            named["CONFIG_PATH"] = arg.split("=", 1)[1]
            flags.remove(arg)


def pretrained_flags(named, cfg, cfg_paths, config_path, cwd):
    """--pretrained/--pretrained_backbone for the PRETRAINED_BACKBONE argument (a .ckpt or
    'none') or, when not given, the configuration's."""
    value = named.get("PRETRAINED_BACKBONE")
    if value == "none" or (value is None and not cfg.pretrained):
        return ["--pretrained=False"], None
    path = pick_path(named, "PRETRAINED_BACKBONE", "pretrained_backbone", cfg_paths, config_path, cwd, "file")
    return ["--pretrained=True", f"--pretrained_backbone={path}"], path


def batch_flags(options, flags, cfg, world_size):
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


def schedule_line(cfg, per_device, world_size):
    """What the device count does to the schedule, in one line."""
    from src.engine.lr_schedule import scaled_lr

    global_batch = per_device * world_size
    lr = scaled_lr(cfg.base_lr, cfg.lr_base_batch, global_batch)
    return (f"schedule: batch {per_device} per device x {world_size} devices = global batch {global_batch}, "
            f"lr {cfg.base_lr:g} x {global_batch}/{cfg.lr_base_batch} = {lr:g}, {cfg.epochs} epochs of "
            f"(training images / {global_batch}) steps, warmup {cfg.warmup_iters} steps")


# ---------------------------------------------------------------- rank table

class Server:
    """One entry of a rank table's server_list: its server_id and [(device_id, rank_id)]."""

    def __init__(self, index, server_id, devices):
        self.index = index
        self.server_id = server_id
        self.devices = devices

    @property
    def rank_ids(self):
        return [rank for _, rank in self.devices]


MAX_TABLE_ID = 65535  # device ids are a server's chip numbers, rank ids count the whole cluster's


def _table_int(value, what, path):
    try:
        number = int(str(value).strip()) if len(str(value)) < 12 else -1
    except ValueError:
        number = -1
    if not 0 <= number <= MAX_TABLE_ID:
        raise LaunchError(f"rank table {path}: {what} is not an integer in [0, {MAX_TABLE_ID}]: {str(value)[:40]!r}")
    return number


def read_rank_table(path):
    """An hccl_tools rank table -> [Server]; LaunchError (one line) for anything unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, UnicodeDecodeError) as err:
        raise LaunchError(f"rank table {path} cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise LaunchError(f"rank table {path} is not JSON: {err}") from None
    except RecursionError:
        raise LaunchError(f"rank table {path} is nested too deeply to be a rank table") from None
    server_list = table.get("server_list") if isinstance(table, dict) else None
    if not isinstance(server_list, list) or not server_list:
        raise LaunchError(f"rank table {path} has no server_list (make it with hccl_tools.py)")
    servers, owner = [], {}
    for index, entry in enumerate(server_list):
        devices = entry.get("device") if isinstance(entry, dict) else None
        if not isinstance(devices, list) or not devices:
            raise LaunchError(f"rank table {path}: server {index} has no devices")
        server_id = str(entry.get("server_id", ""))
        pairs = []
        for device in devices:
            if not isinstance(device, dict) or "device_id" not in device or "rank_id" not in device:
                raise LaunchError(f"rank table {path}: a device of server {index} lacks device_id or rank_id")
            device_id = _table_int(device["device_id"], f"device_id of server {index}", path)
            rank = _table_int(device["rank_id"], f"rank_id of server {index}", path)
            if rank in owner:
                raise LaunchError(f"rank table {path}: rank_id {rank} appears twice (servers {owner[rank]} "
                                  f"and {index})")
            owner[rank] = index
            pairs.append((device_id, rank))
        ids = [d for d, _ in pairs]
        if len(set(ids)) != len(ids):
            raise LaunchError(f"rank table {path}: server {index} lists a device_id twice: {ids}")
        servers.append(Server(index, server_id, pairs))
    total = len(owner)
    if sorted(owner) != list(range(total)):
        missing = sorted(set(range(total)) - set(owner))
        raise LaunchError(f"rank table {path}: rank ids must be 0..{total - 1}, missing {missing}")
    count = table.get("server_count")
    if count is not None and str(count).strip() != str(len(servers)):
        raise LaunchError(f"rank table {path}: server_count is {count} but server_list has {len(servers)} servers")
    return servers


def local_addresses():
    """IP addresses of this machine: `ip -j addr` when available, else the host name's."""
    found = set()
    try:
        out = subprocess.run(["ip", "-j", "addr"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, timeout=10, check=False).stdout
        for interface in json.loads(out or "[]"):
            for addr in interface.get("addr_info", []):
                if addr.get("local"):
                    found.add(addr["local"])
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(info[4][0])
    except OSError:
        pass
    return found


def _same_address(a, b):
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def select_server(servers, server_id=None, addresses=None):
    """-> (Server, how it was found). server_id: a position in server_list or a server_id of the
    table; without it the only server, else the server whose server_id is an address of this
    machine (addresses: default local_addresses())."""
    names = ", ".join(s.server_id or "?" for s in servers)
    if server_id not in (None, ""):
        text = str(server_id).strip()
        if text.isdigit() and int(text) < len(servers):
            return servers[int(text)], f"SERVER_ID={text}"
        for server in servers:
            if server.server_id and server.server_id == text:
                return server, f"SERVER_ID={text}"
        raise LaunchError(f"SERVER_ID={text} is neither a position 0..{len(servers) - 1} in the rank table "
                          f"nor one of its server_ids ({names})")
    if len(servers) == 1:
        return servers[0], "the table's only server"
    addresses = local_addresses() if addresses is None else set(addresses)
    matches = [s for s in servers if any(_same_address(s.server_id, a) for a in addresses)]
    if len(matches) == 1:
        return matches[0], f"its address {matches[0].server_id}"
    if not matches:
        raise LaunchError(f"this machine ({', '.join(sorted(addresses)) or 'no address found'}) is none of the "
                          f"{len(servers)} servers of the rank table ({names}): give SERVER_ID")
    raise LaunchError(f"this machine matches {len(matches)} servers of the rank table "
                      f"({', '.join(s.server_id for s in matches)}): give SERVER_ID")


def cpu_shares(cpus, count):
    """Split the CPUs this process may use among count ranks -> [[cpu, ...]] (disjoint while
    there are at least as many CPUs as ranks, else one CPU each, in turn)."""
    cpus = sorted(cpus)
    if not cpus:
        raise LaunchError("no CPU available to this process")
    if len(cpus) < count:
        return [[cpus[i % len(cpus)]] for i in range(count)]
    per = len(cpus) // count
    return [cpus[i * per:(i + 1) * per] for i in range(count)]


def cpu_list(cpus):
    """[0,1,2,5] -> '0-2,5' (taskset's notation)."""
    parts, start = [], None
    cpus = sorted(cpus)
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)


def plan_ranks(servers, server, cpus):
    """The processes to start on ``server`` -> [{rank_id, device_id, cpus, env}], env being what the
    launcher adds to each rank's environment."""
    rank_size = sum(len(s.devices) for s in servers)
    shares = cpu_shares(cpus, len(server.devices))
    plans = []
    for (device_id, rank), share in zip(server.devices, shares):
        plans.append({"rank_id": rank, "device_id": device_id, "cpus": share,
                      "env": {"RANK_SIZE": str(rank_size), "DEVICE_NUM": str(len(server.devices)),
                              "RANK_ID": str(rank), "DEVICE_ID": str(device_id),
                              "SERVER_ID": str(server.index)}})
    return plans


# What env.log keeps: the variables a rerun of the same launch needs, by name prefix (the launcher's
# own, MindSpore's, the devices', the libraries' settings and the search paths).
ENV_LOG_PREFIXES = ("RANK_", "DEVICE_", "SERVER_ID", "MS_", "MASTER_", "GLOG_", "ASCEND_", "HCCL_", "CUDA_", "NCCL_",
                    "FCOS_", "ONEDNN_", "OMP_", "GLOBAL_BATCH", "LAUNCH_", "PYTHONPATH", "PATH", "LD_LIBRARY_PATH",
                    "LD_PRELOAD", "VIRTUAL_ENV", "CONDA_PREFIX")
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH")
REDACTED = "<redacted>"


def write_env_log(path, env):
    """Write the variables of env that matter for a rerun (ENV_LOG_PREFIXES) to path, readable by
    its owner only (0600); a value whose name looks like a secret (SECRET_WORDS) is replaced."""
    kept = {k: v for k, v in env.items() if k.startswith(ENV_LOG_PREFIXES)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(f"{k}={REDACTED if any(w in k.upper() for w in SECRET_WORDS) else v}\n"
                     for k, v in sorted(kept.items()))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


PID_FILE = "launch.pid"  # in each rank folder: the rank's process, while it may be running


def _runs_in(pid, folder):
    """Whether process pid is alive (not a zombie) and, where /proc tells, works in folder (a rank's
    folder is its working directory; a recycled pid's is not)."""
    if not _pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                return False
        return os.path.realpath(os.readlink(f"/proc/{pid}/cwd")) == os.path.realpath(folder)
    except OSError:
        return True  # no /proc: alive is all we know


def refuse_running(rank_dir):
    """LaunchError when rank_dir holds a rank that is still running."""
    try:
        with open(os.path.join(rank_dir, PID_FILE), encoding="utf-8") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return
    if pid and _runs_in(pid, rank_dir):
        raise LaunchError(f"{rank_dir} belongs to a launch still running (pid {pid}); stop it, or give another "
                          "output_dir")


def claim_rank_dir(rank_dir):
    """Make rank_dir for a new launch. An existing one is kept under <rank_dir>.<its time> (never
    deleted); LaunchError when the rank it holds is still running."""
    if os.path.exists(rank_dir):
        refuse_running(rank_dir)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(rank_dir)))
        kept, n = f"{rank_dir}.{stamp}", 1
        while os.path.exists(kept):
            kept, n = f"{rank_dir}.{stamp}-{n}", n + 1
        os.rename(rank_dir, kept)
    os.makedirs(rank_dir)


def _last_line(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _stop(procs, sig=signal.SIGKILL, grace=10.0):
    """Send sig to each running rank's process group; after grace seconds, SIGKILL what is left."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except OSError:
                pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()


class Interrupted(Exception):
    """SIGINT or SIGTERM reached the launcher while it watched its ranks."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def start_ranks(plans, command, work_dir, base_env, check_seconds, out=print, wait=False):
    """Start one process per plan in <work_dir>/train_parallel<RANK_ID> (log.txt, env.log), bound
    to its CPUs, in its own session, and watch them for check_seconds (or until all have ended);
    with wait, until all have ended. -> ([pid], how many ended). A rank that cannot be started or
    exits with an error while watched: the others are stopped, LaunchError. SIGINT or SIGTERM while
    watching: every rank gets SIGTERM (training saves a checkpoint), then SIGKILL after a grace
    period; Interrupted."""
    procs, started = [], []
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    rank_dirs = [os.path.join(work_dir, f"train_parallel{plan['rank_id']}") for plan in plans]
    for rank_dir in rank_dirs:  # every folder checked before any rank starts
        refuse_running(rank_dir)
    try:
        for plan, rank_dir in zip(plans, rank_dirs):
            claim_rank_dir(rank_dir)
            env = dict(base_env, **plan["env"])
            write_env_log(os.path.join(rank_dir, "env.log"), env)
            log_path = os.path.join(rank_dir, "log.txt")
            cpus = set(plan["cpus"])
            try:  # preexec_fn: the launcher runs no threads; the affinity is set in the child before exec
                with open(log_path, "w", encoding="utf-8") as log:
                    proc = subprocess.Popen(command, cwd=rank_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=lambda c=cpus: os.sched_setaffinity(0, c))
            except (OSError, subprocess.SubprocessError) as err:
                _stop(procs)
                raise LaunchError(f"rank {plan['rank_id']} (device {plan['device_id']}) did not start "
                                  f"({command[0]}: {err}); stopped the {len(procs)} ranks started before it") from None
            with open(os.path.join(rank_dir, PID_FILE), "w", encoding="utf-8") as f:
                f.write(f"{proc.pid}\n")
            procs.append(proc)
            started.append((plan, proc, log_path))
            out(f"rank {plan['rank_id']} (device {plan['device_id']}, CPUs {cpu_list(plan['cpus'])}): pid {proc.pid}, "
                f"log {log_path}")
        deadline = time.monotonic() + check_seconds
        while True:
            for plan, proc, log_path in started:
                code = proc.poll()
                if code not in (None, 0):
                    others = [p for p in procs if p is not proc and p.poll() is None]
                    _stop(others, signal.SIGTERM)
                    last = _last_line(log_path)
                    when = "while the launcher watched" if wait else f"within {check_seconds:g} s of its start"
                    raise LaunchError(f"rank {plan['rank_id']} (device {plan['device_id']}) exited with code {code} "
                                      f"{when}; stopped the {len(others)} other ranks still running; {log_path} "
                                      f"ends: {last or '(empty)'}")
            if all(proc.poll() is not None for proc in procs) or (not wait and time.monotonic() >= deadline):
                return [proc.pid for proc in procs], sum(proc.poll() is not None for proc in procs)
            time.sleep(0.2)
    except Interrupted as err:
        out(f"{err}: stopping the {sum(p.poll() is None for p in procs)} ranks started")
        _stop(procs, signal.SIGTERM)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_seconds_option():
    """LAUNCH_CHECK_SECONDS as a number >= 0; LaunchError in one line otherwise."""
    text = os.environ.get("LAUNCH_CHECK_SECONDS", "").strip()
    if not text:
        return DEFAULT_CHECK_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e7:
        raise LaunchError(f"LAUNCH_CHECK_SECONDS must be a number of seconds >= 0: {text}")
    return value


def run_rank_table(args, out=print):
    positionals, options, flags = split_args(args, ("server_id", "global_batch", "dry_run", "wait"))
    if not positionals:
        raise usage_error("RANK_TABLE_FILE is required")
    check = check_seconds_option()
    cwd = os.getcwd()
    table_path = absolute(positionals[0], cwd)
    named = assign_optional(positionals[1:], ["TRAIN_IMG_DIR", "TRAIN_ANN_FILE", "PRETRAINED_BACKBONE", "CONFIG_PATH"])
    refuse_duplicates(named, flags, {"TRAIN_IMG_DIR": "train_img_dir", "TRAIN_ANN_FILE": "train_ann_file",
                                     "PRETRAINED_BACKBONE": "pretrained_backbone", "CONFIG_PATH": "config_path"})
    need_file("RANK_TABLE_FILE", table_path)
    config_path, cfg, cfg_paths = run_config(named, flags, RANK_TABLE_CONFIG, cwd)
    img_dir = pick_path(named, "TRAIN_IMG_DIR", "train_img_dir", cfg_paths, config_path, cwd, "dir")
    ann_file = pick_path(named, "TRAIN_ANN_FILE", "train_ann_file", cfg_paths, config_path, cwd, "file")
    pretrained, _ = pretrained_flags(named, cfg, cfg_paths, config_path, cwd)

    servers = read_rank_table(table_path)
    server, how = select_server(servers, option(options, "server_id", "SERVER_ID"))
    rank_size = sum(len(s.devices) for s in servers)
    extra_batch, per_device, _ = batch_flags(options, flags, cfg, rank_size)
    output_dir = cfg_paths["output_dir"]
    device_flag = [] if any(a.startswith("--device_target=") for a in flags) else ["--device_target=Ascend"]
    path_flags = [f"--{key}={cfg_paths[key]}" for key in PATH_KEYS
                  if key not in ("train_img_dir", "train_ann_file", "pretrained_backbone") and cfg_paths[key]]
    train_flags = [f"--config_path={config_path}", *device_flag, f"--train_img_dir={img_dir}",
                   f"--train_ann_file={ann_file}", *pretrained, *path_flags, *extra_batch,
                   *without_path_flags(flags)]
    custom = os.environ.get("FCOS_TRAIN_COMMAND", "")
    command = (shlex.split(custom) if custom else [sys.executable, TRAIN_PY]) + train_flags
    plans = plan_ranks(servers, server, os.sched_getaffinity(0))
    ranks = [p["rank_id"] for p in plans]

    out(f"rank table {table_path}: {len(servers)} server(s), RANK_SIZE={rank_size}; this is server {server.index} "
        f"(server_id {server.server_id or '?'}, found by {how}): DEVICE_NUM={len(plans)}, devices "
        f"{[p['device_id'] for p in plans]} as ranks {ranks}")
    out(schedule_line(cfg, per_device, rank_size))
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < len(plans):
        out(f"note: {len(plans)} ranks share the {len(cpus)} CPUs this process may use ({cpu_list(cpus)})")
    out(f"output (checkpoints of rank 0, train[_rank<r>].log): {output_dir}")
    if option(options, "dry_run", None, "") in ("True", "1", "true"):
        out("dry run, nothing started; each rank would run: " + shlex.join(command))
        return 0
    base_env = dict(os.environ, RANK_TABLE_FILE=table_path)
    wait = option(options, "wait", "LAUNCH_WAIT", "") in ("True", "1", "true")
    os.makedirs(output_dir, exist_ok=True)
    _, finished = start_ranks(plans, command, output_dir, base_env, check, out, wait=wait)
    if wait:
        out(f"all {len(plans)} ranks of this server finished without error")
        return 0
    state = ("all finished without error" if finished == len(plans) else
             f"{len(plans) - finished} running after {check:g} s, {finished} finished without error")
    out(f"started: the {len(plans)} ranks of this server ({state}); follow with: "
        f"tail -f {os.path.join(output_dir, f'train_parallel{ranks[0]}', 'log.txt')}")
    return 0


# ---------------------------------------------------------------- msrun

def msrun_plan(args, cwd=None):
    """-> (msrun command, lines to print) for run_distribute_train_msrun.sh."""
    positionals, options, flags = split_args(
        args, ("node_num", "node_rank", "master_addr", "master_port", "global_batch", "dry_run"))
    if len(positionals) < 6:
        raise usage_error(f"6 arguments are required, {len(positionals)} given")
    cwd = cwd or os.getcwd()
    target, device_num = positionals[0], positionals[1]
    if target not in ("GPU", "CPU"):
        raise usage_error(f"DEVICE_TARGET must be GPU or CPU (Ascend: run_distribute_train.sh): {target}")
    if not str(device_num).isdigit() or int(device_num) < 1:
        raise usage_error(f"DEVICE_NUM must be a positive integer: {device_num}")
    device_num = int(device_num)
    named = assign_optional(positionals[6:], ["CONFIG_PATH"])
    refuse_duplicates(dict.fromkeys(["TRAIN_IMG_DIR", "TRAIN_ANN_FILE", "OUTPUT_DIR", "PRETRAINED_BACKBONE"], "")
                      | named, flags, {"TRAIN_IMG_DIR": "train_img_dir", "TRAIN_ANN_FILE": "train_ann_file",
                                       "OUTPUT_DIR": "output_dir", "PRETRAINED_BACKBONE": "pretrained_backbone",
                                       "CONFIG_PATH": "config_path"})
    take_config_flag(named, flags)
    img_dir, ann_file, output_dir = (absolute(p, cwd) for p in positionals[2:5])
    need_dir("TRAIN_IMG_DIR", img_dir)
    need_file("TRAIN_ANN_FILE", ann_file)
    pretrained = positionals[5]
    if pretrained == "none":
        pretrained_args = ["--pretrained=False"]
    else:
        pretrained = absolute(pretrained, cwd)
        need_file("PRETRAINED_BACKBONE", pretrained)
        pretrained_args = ["--pretrained=True", f"--pretrained_backbone={pretrained}"]
    config_path = absolute(named.get("CONFIG_PATH", DEFAULT_CONFIG), cwd)
    need_file("CONFIG_PATH", config_path)

    node_num = integer("NODE_NUM (--node_num)", option(options, "node_num", "NODE_NUM", "1"), 1)
    node_rank = integer("NODE_RANK (--node_rank)", option(options, "node_rank", "NODE_RANK", "0"), 0)
    if node_rank >= node_num:
        raise usage_error(f"NODE_RANK must be below NODE_NUM={node_num}: {node_rank}")
    master_addr = option(options, "master_addr", "MASTER_ADDR", "")
    if node_num > 1 and not master_addr:
        raise usage_error(f"MASTER_ADDR (--master_addr, the address of node 0) is required with NODE_NUM={node_num}")
    master_addr = master_addr or "127.0.0.1"
    master_port = integer("MASTER_PORT (--master_port)",
                          option(options, "master_port", "MASTER_PORT", str(DEFAULT_MASTER_PORT)), 1024)
    if master_port > 65535:
        raise usage_error(f"MASTER_PORT must be at most 65535: {master_port}")
    world = node_num * device_num
    cfg = load_run_config(config_path, flags)
    cfg_paths = resolved_paths(cfg, flags, cwd)
    extra_batch, per_device, _ = batch_flags(options, flags, cfg, world)
    path_flags = [f"--{key}={cfg_paths[key]}" for key in ("val_img_dir", "val_ann_file", "resume", "ckpt_file")
                  if cfg_paths[key]]
    log_dir = os.path.join(output_dir, "msrun_log")
    command = ["msrun", f"--worker_num={world}", f"--local_worker_num={device_num}", f"--node_rank={node_rank}",
               f"--master_addr={master_addr}", f"--master_port={master_port}", f"--log_dir={log_dir}",
               "--join=True", TRAIN_PY, f"--config_path={config_path}", f"--device_target={target}",
               f"--train_img_dir={img_dir}", f"--train_ann_file={ann_file}", f"--output_dir={output_dir}",
               *pretrained_args, *path_flags, *extra_batch, *without_path_flags(flags)]
    first, last = node_rank * device_num, node_rank * device_num + device_num - 1
    lines = [f"msrun: node {node_rank} of {node_num}, {device_num} {target} workers here (ranks {first}-{last} of "
             f"{world}), master {master_addr}:{master_port} (MASTER_ADDR/MASTER_PORT to change it)",
             schedule_line(cfg, per_device, world),
             f"logs: {log_dir}/worker_<rank>.log and {output_dir}/train[_rank<r>].log; checkpoints (rank 0, "
             f"on node 0): {output_dir}/checkpoints"]
    dry = option(options, "dry_run", None, "") in ("True", "1", "true")
    return command, lines, output_dir, dry


def run_msrun(args, out=print):
    command, lines, output_dir, dry = msrun_plan(args)
    for line in lines:
        out(line)
    if dry:
        out("dry run, nothing started: " + shlex.join(command))
        return 0
    msrun = shutil.which("msrun")
    if not msrun:
        raise LaunchError("msrun not found on PATH (it comes with MindSpore 2.3 and later)")
    os.makedirs(output_dir, exist_ok=True)
    sys.stdout.flush()
    os.chdir(REPO_DIR)
    os.execv(msrun, command)
    return 1  # not reached


# ---------------------------------------------------------------- eval

def eval_plan(args, cwd=None):
    """-> (eval.py command, environment additions, output folder) for run_eval.sh."""
    positionals, _, flags = split_args(args, ())
    if len(positionals) < 3:
        raise usage_error(f"DEVICE_TARGET, DEVICE_ID and CKPT_FILE are required, {len(positionals)} given")
    cwd = cwd or os.getcwd()
    target, device_id, ckpt = positionals[:3]
    if target not in ("Ascend", "GPU", "CPU"):
        raise usage_error(f"DEVICE_TARGET must be Ascend, GPU or CPU: {target}")
    if not device_id.isdigit():
        raise usage_error(f"DEVICE_ID must be a non-negative integer: {device_id}")
    ckpt = absolute(ckpt, cwd)
    need_file("CKPT_FILE", ckpt)
    named = assign_optional(positionals[3:], ["VAL_IMG_DIR", "VAL_ANN_FILE", "OUTPUT_DIR", "CONFIG_PATH"])
    refuse_duplicates(dict(named, CKPT_FILE=ckpt), flags,
                      {"CKPT_FILE": "ckpt_file", "VAL_IMG_DIR": "val_img_dir", "VAL_ANN_FILE": "val_ann_file",
                       "OUTPUT_DIR": "output_dir", "CONFIG_PATH": "config_path"})
    config_path, cfg, cfg_paths = run_config(named, flags, DEFAULT_CONFIG, cwd)
    img_dir = pick_path(named, "VAL_IMG_DIR", "val_img_dir", cfg_paths, config_path, cwd, "dir")
    ann_file = pick_path(named, "VAL_ANN_FILE", "val_ann_file", cfg_paths, config_path, cwd, "file")
    if "OUTPUT_DIR" in named:
        output_dir = absolute(named["OUTPUT_DIR"], cwd)
    else:
        output_dir = os.path.join(cfg_paths["output_dir"], "eval")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise usage_error(f"OUTPUT_DIR is not a folder: {output_dir}")
    command = [sys.executable, EVAL_PY, f"--config_path={config_path}", f"--device_target={target}",
               f"--device_id={device_id}", f"--ckpt_file={ckpt}", f"--val_img_dir={img_dir}",
               f"--val_ann_file={ann_file}", f"--output_dir={output_dir}", *without_path_flags(flags)]
    return command, {"DEVICE_ID": device_id}, output_dir, target


def run_eval(args, out=print):
    command, env_add, output_dir, target = eval_plan(args)
    os.makedirs(output_dir, exist_ok=True)
    env = dict(os.environ, **env_add)
    write_env_log(os.path.join(output_dir, "env.log"), env)
    log_path = os.path.join(output_dir, "log.txt")
    out(f"evaluating on {target} device {env_add['DEVICE_ID']}; log: {log_path}")
    sys.stdout.flush()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, cwd=REPO_DIR, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        return proc.wait()


COMMANDS = {"rank_table": run_rank_table, "msrun": run_msrun, "eval": run_eval}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m src.engine.launch {{{','.join(COMMANDS)}}} ARGS...")
        return 1
    name, args = argv[0], argv[1:]
    try:
        return COMMANDS[name](args)
    except LaunchError as err:
        print(f"error: {err}", flush=True)
        if err.usage:
            print("\n".join(USAGE[name]))
        return 1
    except Interrupted as err:
        print(f"stopped by {err}; every rank this launcher started was stopped", flush=True)
        return 128 + err.signum


if __name__ == "__main__":
    sys.exit(main())
