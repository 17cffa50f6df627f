"""Launch scripts reject bad arguments before starting anything: a one-line error (when an
argument is wrong rather than missing), the usage line, exit code 1, and no training process."""
import json
import os
import subprocess

import pytest

from conftest import ROOT

SCRIPTS = os.path.join(ROOT, "scripts")


def run_script(name, *args, cwd=None):
    """bash scripts/<name> args... -> CompletedProcess (stdout and stderr together)."""
    return subprocess.run(["bash", os.path.join(SCRIPTS, name), *map(str, args)], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)


def assert_rejected(result, name, error=None):
    assert result.returncode == 1, result.stdout
    assert f"Usage: bash scripts/{name}" in result.stdout
    if error:
        assert f"error: {error}" in result.stdout


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


def rank_table(path, servers):
    """Write an hccl_tools-style rank table with the given device counts per server."""
    rank = 0
    server_list = []
    for index, count in enumerate(servers):
        devices = []
        for device in range(count):
            devices.append({"device_id": str(device), "device_ip": f"192.{device}.27.6", "rank_id": str(rank)})
            rank += 1
        server_list.append({"server_id": f"10.0.0.{index}", "device": devices, "host_nic_ip": "reserve"})
    path.write_text(json.dumps({"version": "1.0", "server_count": str(len(servers)),
                                "server_list": server_list, "status": "completed"}))
    return path


@pytest.mark.parametrize("name, args", [
    ("run_standalone_train.sh", ["CPU", "a", "b"]),
    ("run_eval.sh", ["CPU", "a", "b", "c"]),
    ("run_distribute_train.sh", ["a", "b", "c"]),
    ("run_distribute_train_msrun.sh", ["CPU", "2", "a", "b", "c"]),
])
def test_too_few_arguments_print_usage(name, args):
    assert_rejected(run_script(name), name)
    assert_rejected(run_script(name, *args), name)


def test_standalone_train_checks_paths(data):
    name = "run_standalone_train.sh"
    assert_rejected(run_script(name, "CPU", data["missing"], data["ann_file"], data["missing"]),
                    name, f"TRAIN_IMG_DIR is not a folder: {data['missing']}")
    assert_rejected(run_script(name, "CPU", data["img_dir"], data["missing"], data["missing"]),
                    name, "TRAIN_ANN_FILE is not a file")
    assert_rejected(run_script(name, "CPU", data["img_dir"], data["ann_file"], data["missing"], data["missing"]),
                    name, "CONFIG_PATH is not a file")
    assert not data["missing"].exists()  # the output folder is only made once the checks pass


def test_eval_checks_paths(data):
    name = "run_eval.sh"
    assert_rejected(run_script(name, "CPU", data["missing"], data["img_dir"], data["ann_file"], data["missing"]),
                    name, "CKPT_FILE is not a file")
    assert_rejected(run_script(name, "CPU", data["backbone"], data["missing"], data["ann_file"], data["missing"]),
                    name, "VAL_IMG_DIR is not a folder")
    assert_rejected(run_script(name, "CPU", data["backbone"], data["img_dir"], data["missing"], data["missing"]),
                    name, "VAL_ANN_FILE is not a file")
    assert not data["missing"].exists()


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


@pytest.mark.parametrize("content, error", [
    ("not json", "cannot read the devices of one server from RANK_TABLE_FILE"),
    (None, "cannot read the devices of one server from RANK_TABLE_FILE"),
    ({"server_list": [{"device": []}]}, "no devices in RANK_TABLE_FILE"),
])
def test_distribute_train_rejects_unusable_rank_tables(data, tmp_path, content, error):
    name = "run_distribute_train.sh"
    path = tmp_path / "rank_table.json"
    if content is None:
        rank_table(path, [2, 2])  # two servers: each must start its own devices
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    result = run_script(name, path, data["img_dir"], data["ann_file"], "none")
    assert_rejected(result, name, error)
    assert "launching" not in result.stdout


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
    assert not data["missing"].exists()
