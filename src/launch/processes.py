"""Starting the ranks of this server and watching them: CPU shares, rank folders (an earlier
launch's kept, a running one refused), env.log (secrets redacted, 0600), the start check, --wait
supervision, and Ctrl-C/SIGTERM reaching every rank."""
import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

from src.launch.arguments import DEFAULT_CHECK_SECONDS, LaunchError
from src.utils.io import pid_alive

if TYPE_CHECKING:
    from src.launch.rank_table import Server


def cpu_shares(cpus: Iterable[int], count: int) -> List[List[int]]:
    """Split the CPUs this process may use among count ranks -> [[cpu, ...]] (disjoint while
    there are at least as many CPUs as ranks, else one CPU each, in turn)."""
    cpus = sorted(cpus)
    if not cpus:
        raise LaunchError("no CPU available to this process")
    if len(cpus) < count:
        return [[cpus[i % len(cpus)]] for i in range(count)]
    per = len(cpus) // count
    return [cpus[i * per:(i + 1) * per] for i in range(count)]


def cpu_list(cpus: Iterable[int]) -> str:
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


def plan_ranks(servers: Sequence["Server"], server: "Server", cpus: Iterable[int]) -> List[Dict[str, Any]]:
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


def write_env_log(path: str, env: Mapping[str, str]) -> None:
    """Write the variables of env that matter for a rerun (ENV_LOG_PREFIXES) to path, readable by
    its owner only (0600); a value whose name looks like a secret (SECRET_WORDS) is replaced."""
    kept = {k: v for k, v in env.items() if k.startswith(ENV_LOG_PREFIXES)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(f"{k}={REDACTED if any(w in k.upper() for w in SECRET_WORDS) else v}\n"
                     for k, v in sorted(kept.items()))


PID_FILE = "launch.pid"  # in each rank folder: the rank's process, while it may be running


def _runs_in(pid, folder):
    """Whether process pid is alive (not a zombie) and, where /proc tells, works in folder (a rank's
    folder is its working directory; a recycled pid's is not)."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                return False
        return os.path.realpath(os.readlink(f"/proc/{pid}/cwd")) == os.path.realpath(folder)
    except OSError:
        return True  # no /proc: alive is all we know


def refuse_running(rank_dir: str) -> None:
    """LaunchError when rank_dir holds a rank that is still running."""
    try:
        with open(os.path.join(rank_dir, PID_FILE), encoding="utf-8") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return
    if pid and _runs_in(pid, rank_dir):
        raise LaunchError(f"{rank_dir} belongs to a launch still running (pid {pid}); stop it, or give another "
                          "output_dir")


def claim_rank_dir(rank_dir: str) -> None:
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

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def start_ranks(plans: Sequence[Dict[str, Any]], command: Sequence[str], work_dir: str, base_env: Mapping[str, str],
                check_seconds: float, out: Callable[[str], Any] = print, wait: bool = False) -> Tuple[List[int], int]:
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


def check_seconds_option() -> float:
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
