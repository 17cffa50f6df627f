"""Launch scripts: bad arguments are refused before anything is created or started (a one-line
error, the usage lines, exit code 1); run_distribute_train.sh starts real processes - a stand-in
for train.py (FCOS_TRAIN_COMMAND) that records what it was given - for the devices of this server
of one- and multi-server rank tables, bound to the CPUs this process may use, and fails in one
line when a rank does not start or dies at once."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

SCRIPTS = os.path.join(ROOT, "scripts")
LAUNCH_VARS = ("SERVER_ID", "GLOBAL_BATCH", "NODE_NUM", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
               "FCOS_TRAIN_COMMAND", "LAUNCH_CHECK_SECONDS", "RANK_TABLE_FILE", "RANK_SIZE", "RANK_ID")

# Stands in for train.py: records its arguments, folder, CPUs and launcher environment in
# $PROBE_DIR/rank<RANK_ID>.json, then exits with 3 if it is rank $PROBE_FAIL_RANK, else sleeps
# $PROBE_SLEEP seconds and exits 0.
PROBE = '''
import json, os, sys, time
rank = os.environ["RANK_ID"]
record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "cpus": sorted(os.sched_getaffinity(0)), "pid": os.getpid(),
          "env": {k: os.environ.get(k) for k in ("RANK_TABLE_FILE", "RANK_SIZE", "DEVICE_NUM", "RANK_ID",
                                                 "DEVICE_ID", "SERVER_ID")}}
path = os.path.join(os.environ["PROBE_DIR"], f"rank{rank}.json")
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path)
print(f"probe rank {rank} started", flush=True)
if os.environ.get("PROBE_FAIL_RANK") == rank:
    print("probe: failing on purpose", flush=True)
    sys.exit(3)
time.sleep(float(os.environ.get("PROBE_SLEEP", "0")))
'''


def run_script(name, *args, cwd=None, env=None, prefix=(), timeout=60):
    """bash scripts/<name> args... -> CompletedProcess (stdout and stderr together), with this
    interpreter as `python` and no launcher variables from the calling shell."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    base["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return subprocess.run([*prefix, "bash", os.path.join(SCRIPTS, name), *map(str, args)], cwd=cwd,
                          env=dict(base, **(env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, check=False)


def assert_rejected(result, name, error=None):
    assert result.returncode == 1, result.stdout
    assert f"Usage: bash scripts/{name}" in result.stdout
    assert "Traceback" not in result.stdout
    if error:
        assert f"error: {error}" in result.stdout, result.stdout


def assert_one_line_error(result, error):
    """Exit code 1 and the output is one line: error: ... naming ``error``."""
    assert result.returncode == 1, result.stdout
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and error in lines[0], result.stdout


@pytest.fixture()
def data(tmp_path):
    """A real image folder, annotation file and backbone file: only the path under test is wrong."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    ann_file = tmp_path / "annotations.json"
    ann_file.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    backbone = tmp_path / "backbone.ckpt"
    backbone.write_bytes(b"")
    return {"img_dir": img_dir, "ann_file": ann_file, "backbone": backbone, "missing": tmp_path / "missing"}


@pytest.fixture()
def config(tmp_path, data):
    """A configuration naming the data and output: the rank table is then the only argument needed.
    train_img_dir is relative, hence relative to the repository root."""
    path = tmp_path / "run.yaml"
    path.write_text(f'train_img_dir: "data"\ntrain_ann_file: "{data["ann_file"]}"\n'
                    f'output_dir: "{tmp_path / "out"}"\npretrained: True\npretrained_backbone: "{data["backbone"]}"\n'
                    "batch_size: 2\nlr_base_batch: 16\nbase_lr: 0.01\n")
    return path


@pytest.fixture()
def probe(tmp_path):
    """-> (environment that makes every rank run the probe, folder of its records)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    records = tmp_path / "records"
    records.mkdir()
    return {"FCOS_TRAIN_COMMAND": f"{sys.executable} {script}", "PROBE_DIR": str(records)}, records


def read_records(folder):
    return {int(name[4:-5]): json.loads((folder / name).read_text())
            for name in os.listdir(folder) if name.startswith("rank") and name.endswith(".json")}


def rank_table(path, servers, server_ids=None):
    """Write an hccl_tools-style rank table with the given device counts per server."""
    rank = 0
    server_list = []
    for index, count in enumerate(servers):
        devices = []
        for device in range(count):
            devices.append({"device_id": str(device), "device_ip": f"192.{device}.27.6", "rank_id": str(rank)})
            rank += 1
        server_id = server_ids[index] if server_ids else f"10.0.0.{index}"
        server_list.append({"server_id": server_id, "device": devices, "host_nic_ip": "reserve"})
    path.write_text(json.dumps({"version": "1.0", "server_count": str(len(servers)),
                                "server_list": server_list, "status": "completed"}))
    return path


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------- arguments

@pytest.mark.parametrize("name, args", [
    ("run_standalone_train.sh", ["CPU", "a", "b"]),
    ("run_eval.sh", ["CPU", "0"]),
    ("run_distribute_train_msrun.sh", ["CPU", "2", "a", "b", "c"]),
])
def test_too_few_arguments_print_usage(name, args):
    assert_rejected(run_script(name), name)
    assert_rejected(run_script(name, *args), name)


def test_distribute_train_needs_the_rank_table():
    assert_rejected(run_script("run_distribute_train.sh"), "run_distribute_train.sh", "RANK_TABLE_FILE is required")


def test_standalone_train_checks_paths(data):
    name = "run_standalone_train.sh"
    assert_rejected(run_script(name, "CPU", data["missing"], data["ann_file"], data["missing"]),
                    name, f"TRAIN_IMG_DIR is not a folder: {data['missing']}")
    assert_rejected(run_script(name, "CPU", data["img_dir"], data["ann_file"], data["missing"], data["missing"]),
                    name, "CONFIG_PATH is not a file")
    assert_rejected(run_script(name, "CPU", data["img_dir"], data["missing"], data["missing"]),
                    name, "TRAIN_ANN_FILE is not a file")
    assert not data["missing"].exists()  # the output folder is only made once the checks pass


def test_eval_checks_arguments_before_creating_anything(data, tmp_path):
    name = "run_eval.sh"
    ckpt, img, ann, out = data["backbone"], data["img_dir"], data["ann_file"], data["missing"]
    assert_rejected(run_script(name, "NPU", 0, ckpt, img, ann, out), name, "DEVICE_TARGET must be Ascend, GPU or CPU")
    assert_rejected(run_script(name, "CPU", "first", ckpt, img, ann, out), name,
                    "DEVICE_ID must be a non-negative integer: first")
    assert_rejected(run_script(name, "CPU", 0, data["missing"], img, ann, out), name, "CKPT_FILE is not a file")
    assert_rejected(run_script(name, "CPU", 0, ckpt, data["missing"], ann, out), name, "VAL_IMG_DIR is not a folder")
    assert_rejected(run_script(name, "CPU", 0, ckpt, img, data["missing"], out), name, "VAL_ANN_FILE is not a file")
    assert_rejected(run_script(name, "CPU", 0, ckpt, img, ann, out, tmp_path / "missing.yaml"), name,
                    "CONFIG_PATH is not a file")
    assert_rejected(run_script(name, "CPU", 0, ckpt, img, ann, out, "--score_threshold=high"), name,
                    "--score_threshold: expected a number, got 'high'")
    # data paths default to the configuration: default_config.yaml names none
    assert_rejected(run_script(name, "CPU", 0, ckpt), name, "VAL_IMG_DIR not given and val_img_dir is empty in "
                    f"{os.path.join(ROOT, 'default_config.yaml')}")
    cfg = tmp_path / "val.yaml"
    cfg.write_text(f'val_img_dir: "{img}"\nval_ann_file: "{data["missing"]}"\n')
    assert_rejected(run_script(name, "CPU", 0, ckpt, cfg), name,
                    f"VAL_ANN_FILE (val_ann_file of {cfg}) is not a file: {data['missing']}")
    assert not out.exists()


def test_distribute_train_checks_rank_table_and_paths(data, tmp_path):
    name = "run_distribute_train.sh"
    table = rank_table(tmp_path / "rank_table_2p.json", [2])
    assert_rejected(run_script(name, data["missing"], data["img_dir"], data["ann_file"], "none"),
                    name, "RANK_TABLE_FILE is not a file")
    assert_rejected(run_script(name, table, data["missing"], data["ann_file"], "none"),
                    name, "TRAIN_IMG_DIR is not a folder")
    assert_rejected(run_script(name, table, data["img_dir"], data["missing"], "none"),
                    name, "TRAIN_ANN_FILE is not a file")
    assert_rejected(run_script(name, table, data["img_dir"], data["ann_file"], data["missing"]),
                    name, "PRETRAINED_BACKBONE is not a file")
    assert_rejected(run_script(name, table, data["img_dir"], data["ann_file"], "none", data["missing"]),
                    name, "CONFIG_PATH is not a file")
    assert_rejected(run_script(name, table, data["img_dir"], data["ann_file"], "none", "--epochs=many"),
                    name, "--epochs: expected an integer, got 'many'")
    # the rank table alone takes data and backbone from configs/coco_r50_1x.yaml (COCO at <repo>/coco2017)
    assert_rejected(run_script(name, table), name, "TRAIN_IMG_DIR (train_img_dir of "
                    f"{os.path.join(ROOT, 'configs', 'coco_r50_1x.yaml')}) is not a folder: "
                    f"{os.path.join(ROOT, 'coco2017', 'train2017')}")
    # ... and with a configuration that names no data, says so
    empty = tmp_path / "empty.yaml"
    empty.write_text('train_img_dir: ""\n')
    assert_rejected(run_script(name, table, str(empty)), name,
                    f"TRAIN_IMG_DIR not given and train_img_dir is empty in {empty}")
    assert not (tmp_path / "output").exists()


@pytest.mark.parametrize("content, error", [
    ("not json", "is not JSON"),
    ({"server_list": [{"device": []}]}, "server 0 has no devices"),
    ({"server_list": [{"device": [{"device_id": "0", "rank_id": "0"}, {"device_id": "1", "rank_id": "0"}]}]},
     "rank_id 0 appears twice"),
    ({"server_list": [{"server_id": "198.51.100.1", "device": [{"device_id": "0", "rank_id": "0"}]},
                      {"server_id": "198.51.100.2", "device": [{"device_id": "0", "rank_id": "1"}]}]},
     "is none of the 2 servers of the rank table (198.51.100.1, 198.51.100.2): give SERVER_ID"),
    ({"server_list": [{"device": [{"device_id": "99999999999999999999", "rank_id": "0"}]}]},
     "device_id of server 0 is not an integer in [0, 65535]"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_distribute_train_rejects_unusable_rank_tables_in_one_line(tmp_path, config, probe, content, error):
    path = tmp_path / "rank_table.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    env, records = probe
    assert_one_line_error(run_script("run_distribute_train.sh", path, config, env=env), error)
    assert not os.listdir(records) and not (tmp_path / "out").exists()  # nothing started, nothing made


def test_msrun_checks_target_count_and_paths(data):
    name = "run_distribute_train_msrun.sh"
    good = [data["img_dir"], data["ann_file"], data["missing"], "none"]
    assert_rejected(run_script(name, "Ascend", 2, *good), name, "DEVICE_TARGET must be GPU or CPU")
    for count in ("0", "two", "-1"):
        assert_rejected(run_script(name, "CPU", count, *good), name, "DEVICE_NUM must be a positive integer")
    assert_rejected(run_script(name, "CPU", 2, data["missing"], data["ann_file"], data["missing"], "none"),
                    name, "TRAIN_IMG_DIR is not a folder")
    assert_rejected(run_script(name, "CPU", 2, data["img_dir"], data["missing"], data["missing"], "none"),
                    name, "TRAIN_ANN_FILE is not a file")
    assert_rejected(run_script(name, "GPU", 2, data["img_dir"], data["ann_file"], data["missing"], data["missing"]),
                    name, "PRETRAINED_BACKBONE is not a file")
    assert_rejected(run_script(name, "CPU", 2, *good, data["missing"]), name, "CONFIG_PATH is not a file")
    assert_rejected(run_script(name, "CPU", 2, *good, "--node_num=2"), name,
                    "MASTER_ADDR (--master_addr, the address of node 0) is required with NODE_NUM=2")
    assert_rejected(run_script(name, "CPU", 2, *good, env={"NODE_NUM": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}),
                    name, "NODE_RANK must be below NODE_NUM=2: 2")
    assert not data["missing"].exists()


def test_msrun_dry_run_prints_each_nodes_command(data):
    good = [data["img_dir"], data["ann_file"], data["missing"], "none"]
    result = run_script("run_distribute_train_msrun.sh", "GPU", 8, *good, "--node_num=2", "--node_rank=1",
                        "--master_addr=10.0.0.1", "--dry_run")
    assert result.returncode == 0, result.stdout
    assert "msrun: node 1 of 2, 8 GPU workers here (ranks 8-15 of 16), master 10.0.0.1:8118" in result.stdout
    assert ("msrun --worker_num=16 --local_worker_num=8 --node_rank=1 --master_addr=10.0.0.1 --master_port=8118"
            in result.stdout)
    assert "global batch 32" in result.stdout  # default_config.yaml: batch 2 per device
    assert not data["missing"].exists()


# ---------------------------------------------------------------- rank-table launches (real processes)

def test_rank_table_alone_with_a_configuration_starts_every_device(tmp_path, config, probe, data):
    env, records = probe
    table = rank_table(tmp_path / "rank_table_2p.json", [2])
    result = run_script("run_distribute_train.sh", table, config, env=env)
    assert result.returncode == 0, result.stdout
    assert "started: the 2 ranks of this server" in result.stdout
    assert "this is server 0 (server_id 10.0.0.0, found by the table's only server)" in result.stdout
    assert "global batch 4" in result.stdout and "lr 0.01 x 4/16 = 0.0025" in result.stdout
    found = read_records(records)
    assert sorted(found) == [0, 1]
    out = tmp_path / "out"
    for rank, record in found.items():
        assert record["env"] == {"RANK_TABLE_FILE": str(table), "RANK_SIZE": "2", "DEVICE_NUM": "2",
                                 "RANK_ID": str(rank), "DEVICE_ID": str(rank), "SERVER_ID": "0"}
        assert record["cwd"] == str(out / f"train_parallel{rank}")
        argv = record["argv"]
        # data, backbone and output from the configuration, as absolute paths (relative ones from the repo root)
        assert f"--train_img_dir={os.path.join(ROOT, 'data')}" in argv
        assert f"--train_ann_file={data['ann_file']}" in argv
        assert f"--pretrained_backbone={data['backbone']}" in argv and "--pretrained=True" in argv
        assert f"--output_dir={out}" in argv and "--device_target=Ascend" in argv
        assert f"--config_path={config}" in argv
        rank_dir = out / f"train_parallel{rank}"
        assert f"probe rank {rank} started" in (rank_dir / "log.txt").read_text()
        assert f"RANK_ID={rank}\n" in (rank_dir / "env.log").read_text()

    # positional overrides, relative to the caller's folder
    (tmp_path / "other").mkdir()
    result = run_script("run_distribute_train.sh", table, "other", data["ann_file"], "none", config,
                        "--device_target=CPU", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout
    argv = read_records(records)[0]["argv"]
    assert f"--train_img_dir={tmp_path / 'other'}" in argv and "--pretrained=False" in argv
    assert argv[-1] == "--device_target=CPU" and "--device_target=Ascend" not in argv


def usable_cpus(count):
    cpus = sorted(os.sched_getaffinity(0))[:count]
    if len(cpus) < count:
        pytest.skip(f"needs {count} CPUs")
    return cpus


def test_four_devices_on_two_cpus_all_start_on_those_cpus(tmp_path, config, probe):
    env, records = probe
    cpus = usable_cpus(2)
    table = rank_table(tmp_path / "rank_table_4p.json", [4])
    result = run_script("run_distribute_train.sh", table, config, env=env,
                        prefix=["taskset", "-c", ",".join(map(str, cpus))])
    assert result.returncode == 0, result.stdout
    assert "note: 4 ranks share the 2 CPUs this process may use" in result.stdout
    found = read_records(records)
    assert sorted(found) == [0, 1, 2, 3]
    assert [found[r]["cpus"] for r in range(4)] == [[cpus[0]], [cpus[1]], [cpus[0]], [cpus[1]]]
    assert all(found[r]["env"]["RANK_SIZE"] == "4" and found[r]["env"]["DEVICE_NUM"] == "4" for r in range(4))


def test_cpu_ranges_come_from_the_allowed_cpus_not_from_zero(tmp_path, config, probe):
    env, records = probe
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    last = cpus[-1]  # the highest CPU only: a range counted from 0 would miss it
    table = rank_table(tmp_path / "rank_table_2p.json", [2])
    result = run_script("run_distribute_train.sh", table, config, env=env, prefix=["taskset", "-c", str(last)])
    assert result.returncode == 0, result.stdout
    assert [r["cpus"] for r in read_records(records).values()] == [[last], [last]]
    # as many CPUs as ranks: one each
    result = run_script("run_distribute_train.sh", table, config, env=env,
                        prefix=["taskset", "-c", f"{cpus[0]},{cpus[1]}"])
    assert result.returncode == 0, result.stdout
    found = read_records(records)
    assert [found[0]["cpus"], found[1]["cpus"]] == [[cpus[0]], [cpus[1]]]


def test_a_rank_that_dies_at_once_fails_the_launch_and_stops_the_others(tmp_path, config, probe):
    env, records = probe
    table = rank_table(tmp_path / "rank_table_4p.json", [4])
    start = time.monotonic()
    result = run_script("run_distribute_train.sh", table, config,
                        env=dict(env, PROBE_FAIL_RANK="2", PROBE_SLEEP="120", LAUNCH_CHECK_SECONDS="60"))
    assert result.returncode == 1, result.stdout
    assert time.monotonic() - start < 50  # failed when rank 2 died, not at the end of the watch
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stdout.strip().splitlines()[-1] == errors[0]
    assert "rank 2 (device 2) exited with code 3" in errors[0] and "probe: failing on purpose" in errors[0]
    assert "started:" not in result.stdout and "Traceback" not in result.stdout
    found = read_records(records)
    time.sleep(0.5)
    assert not [rank for rank, record in found.items() if alive(record["pid"])]  # the others were stopped


def test_a_rank_that_cannot_be_started_fails_the_launch(tmp_path, config):
    table = rank_table(tmp_path / "rank_table_2p.json", [2])
    result = run_script("run_distribute_train.sh", table, config,
                        env={"FCOS_TRAIN_COMMAND": str(tmp_path / "no_such_program")})
    assert result.returncode == 1, result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("error: rank 0 (device 0) did not start")


@pytest.mark.parametrize("layout, chosen, env, args, how", [
    ([2, 2], 1, {"SERVER_ID": "1"}, [], "server_id 10.0.0.1, found by SERVER_ID=1"),
    ([2, 2], 0, {}, ["--server_id=10.0.0.0"], "server_id 10.0.0.0, found by SERVER_ID=10.0.0.0"),
    ([2, 2, 2, 2], 3, {"SERVER_ID": "0"}, ["--server_id=3"], "server_id 10.0.0.3, found by SERVER_ID=3"),
    ([8, 8, 8, 8], 2, {"SERVER_ID": "2"}, [], "server_id 10.0.0.2, found by SERVER_ID=2"),
    ([1, 2], 1, {}, [], "server_id 127.0.0.1, found by its address 127.0.0.1"),
])
def test_multi_server_tables_start_this_servers_devices(tmp_path, config, probe, layout, chosen, env, args, how):
    probe_env, records = probe
    server_ids = ["198.51.100.7", "127.0.0.1"] if how.endswith("its address 127.0.0.1") else None
    table = rank_table(tmp_path / "rank_table.json", layout, server_ids)
    result = run_script("run_distribute_train.sh", table, config, *args, env=dict(probe_env, **env))
    assert result.returncode == 0, result.stdout
    assert f"this is server {chosen} ({how})" in result.stdout
    first, count, total = sum(layout[:chosen]), layout[chosen], sum(layout)
    assert f"RANK_SIZE={total}" in result.stdout and f"DEVICE_NUM={count}" in result.stdout
    found = read_records(records)
    assert sorted(found) == list(range(first, first + count))
    for rank, record in found.items():
        assert record["env"] == {"RANK_TABLE_FILE": str(table), "RANK_SIZE": str(total), "DEVICE_NUM": str(count),
                                 "RANK_ID": str(rank), "DEVICE_ID": str(rank - first), "SERVER_ID": str(chosen)}
        assert "--server_id=3" not in record["argv"]  # launcher options do not reach train.py
    assert sorted(os.listdir(tmp_path / "out")) == [f"train_parallel{r}" for r in sorted(found)]


def test_global_batch_is_split_over_all_servers_or_refused(tmp_path, config, probe):
    env, records = probe
    table = rank_table(tmp_path / "rank_table.json", [2, 2])
    result = run_script("run_distribute_train.sh", table, config, "--global_batch=16", env=dict(env, SERVER_ID="1"))
    assert result.returncode == 0, result.stdout
    assert "batch 4 per device x 4 devices = global batch 16, lr 0.01 x 16/16 = 0.01" in result.stdout
    assert all("--batch_size=4" in r["argv"] for r in read_records(records).values())
    for name in os.listdir(records):
        os.remove(records / name)
    result = run_script("run_distribute_train.sh", table, config, env=dict(env, SERVER_ID="1", GLOBAL_BATCH="6"))
    assert_one_line_error(result, "the global batch 6 cannot be split over 4 devices")
    assert not os.listdir(records)


def test_dry_run_starts_nothing(tmp_path, config, probe):
    env, records = probe
    table = rank_table(tmp_path / "rank_table.json", [8])
    result = run_script("run_distribute_train.sh", table, config, "--dry_run", env=env)
    assert result.returncode == 0, result.stdout
    assert "dry run, nothing started" in result.stdout and "RANK_SIZE=8" in result.stdout
    assert not os.listdir(records) and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- faults: signals, supervision, env.log

def _launch(tmp_path, config, env, *args, ranks=2):
    """Start run_distribute_train.sh in a process group of its own (a terminal's Ctrl-C reaches the
    whole group) -> Popen."""
    table = rank_table(tmp_path / f"rank_table_{ranks}p.json", [ranks])
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    base["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return subprocess.Popen(["bash", os.path.join(SCRIPTS, "run_distribute_train.sh"), str(table), str(config), *args],
                            env=dict(base, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for_records(records, count, timeout=60):
    deadline = time.monotonic() + timeout
    while len(read_records(records)) < count:
        assert time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.1)
    return read_records(records)


def test_ctrl_c_during_the_watch_stops_every_rank(tmp_path, config, probe):
    """Mutation caught: ranks in sessions of their own and no handler (they kept running, exit 130)."""
    env, records = probe
    proc = _launch(tmp_path, config, dict(env, PROBE_SLEEP="120", LAUNCH_CHECK_SECONDS="60"))
    found = _wait_for_records(records, 2)
    os.killpg(proc.pid, __import__("signal").SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "stopped by SIGINT" in output and "Traceback" not in output
    time.sleep(0.5)
    assert not [rank for rank, record in found.items() if alive(record["pid"])], output


def test_wait_reports_a_rank_killed_after_the_watch_and_stops_the_rest(tmp_path, config, probe):
    env, records = probe
    proc = _launch(tmp_path, config, dict(env, PROBE_SLEEP="120", LAUNCH_CHECK_SECONDS="1"), "--wait", ranks=3)
    found = _wait_for_records(records, 3)
    time.sleep(2)  # past the 1-second watch
    assert proc.poll() is None, "--wait must keep the launcher in the foreground"
    os.kill(found[1]["pid"], __import__("signal").SIGKILL)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 (device 1) exited with code -9 while the launcher watched"), output
    assert "probe rank 1 started" in last  # its log's last line
    time.sleep(0.5)
    assert not [rank for rank, record in found.items() if alive(record["pid"])]


def test_env_log_keeps_what_a_rerun_needs_with_secrets_redacted_owner_only(tmp_path, config, probe):
    env, records = probe
    result = run_script("run_distribute_train.sh", rank_table(tmp_path / "t.json", [1]), config,
                        env=dict(env, FCOS_HUB_TOKEN="tok-123", MS_ACCESS_KEY="ak-456", MY_DB_PASSWORD="pw-789",
                                 MS_SUBMODULE_LOG_v="{PIPELINE:3}"))
    assert result.returncode == 0, result.stdout
    path = tmp_path / "out" / "train_parallel0" / "env.log"
    text = path.read_text()
    assert "RANK_ID=0\n" in text and "RANK_TABLE_FILE=" in text and "MS_SUBMODULE_LOG_v={PIPELINE:3}" in text
    assert "FCOS_HUB_TOKEN=<redacted>" in text and "MS_ACCESS_KEY=<redacted>" in text
    assert not any(secret in text for secret in ("tok-123", "ak-456", "pw-789"))
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_second_launch_keeps_the_first_folders_and_refuses_while_they_run(tmp_path, config, probe):
    """Mutation caught: shutil.rmtree of train_parallel<i> (a running launch's folder removed)."""
    env, records = probe
    first = run_script("run_distribute_train.sh", rank_table(tmp_path / "t.json", [1]), config,
                       env=dict(env, PROBE_SLEEP="120", LAUNCH_CHECK_SECONDS="0.5"))
    assert first.returncode == 0, first.stdout
    running = read_records(records)[0]["pid"]
    try:
        second = run_script("run_distribute_train.sh", rank_table(tmp_path / "t.json", [1]), config, env=env)
        assert second.returncode == 1 and "Traceback" not in second.stdout, second.stdout
        last = second.stdout.strip().splitlines()[-1]
        assert last.startswith("error: ") and f"belongs to a launch still running (pid {running})" in last
        assert "probe rank 0 started" in (tmp_path / "out" / "train_parallel0" / "log.txt").read_text()
    finally:
        os.kill(running, __import__("signal").SIGKILL)
    time.sleep(0.3)
    third = run_script("run_distribute_train.sh", rank_table(tmp_path / "t.json", [1]), config, env=env)
    assert third.returncode == 0, third.stdout
    kept = [name for name in os.listdir(tmp_path / "out") if name.startswith("train_parallel0.")]
    assert len(kept) == 1 and "probe rank 0 started" in (tmp_path / "out" / kept[0] / "log.txt").read_text()


@pytest.mark.parametrize("value", ["ten", "-1", "nan"])
def test_a_bad_check_time_is_one_line(tmp_path, config, probe, value):
    env, _ = probe
    result = run_script("run_distribute_train.sh", rank_table(tmp_path / "t.json", [1]), config,
                        env=dict(env, LAUNCH_CHECK_SECONDS=value))
    assert_one_line_error(result, "LAUNCH_CHECK_SECONDS must be a number of seconds >= 0")
