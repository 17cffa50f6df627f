"""Launch planning and process start for the shell launchers (they only call this module).

    python -m src.launch rank_table ARGS...   scripts/run_distribute_train.sh (Ascend, rank table)
    python -m src.launch msrun ARGS...        scripts/run_distribute_train_msrun.sh (GPU/CPU, msrun)
    python -m src.launch eval ARGS...         scripts/run_eval.sh

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
import os
import shlex
import shutil
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from src.launch.arguments import DEFAULT_CONFIG, DEFAULT_MASTER_PORT, EVAL_PY, LaunchError, PATH_KEYS, RANK_TABLE_CONFIG, REPO_DIR, TRAIN_PY, USAGE, absolute, assign_optional, batch_flags, integer, load_run_config, need_dir, need_file, option, pick_path, pretrained_flags, refuse_duplicates, resolved_paths, run_config, schedule_line, split_args, take_config_flag, usage_error, without_path_flags
from src.launch.processes import Interrupted, check_seconds_option, cpu_list, plan_ranks, start_ranks, write_env_log
from src.launch.rank_table import read_rank_table, select_server


def run_rank_table(args: Sequence[str], out: Callable[[str], Any] = print) -> int:
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

def msrun_plan(args: Sequence[str], cwd: Optional[str] = None) -> Tuple[List[str], List[str], str, bool]:
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


def run_msrun(args: Sequence[str], out: Callable[[str], Any] = print) -> int:
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

def eval_plan(args: Sequence[str], cwd: Optional[str] = None) -> Tuple[List[str], Dict[str, str], str, str]:
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


def run_eval(args: Sequence[str], out: Callable[[str], Any] = print) -> int:
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m src.launch {{{','.join(COMMANDS)}}} ARGS...")
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
