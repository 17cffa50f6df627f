"""src/launch/ without starting processes: rank tables of one, 2 and 4 servers (which
devices start on each server, RANK_SIZE, RANK_ID, DEVICE_NUM), finding this server, CPU shares,
the global batch split, and the msrun command for one and several nodes."""
import json
import os

import pytest

from conftest import ROOT
from src.launch import arguments, commands, processes, rank_table as tables
from src.launch.arguments import LaunchError
from tests.test_scripts import rank_table


def write_table(path, servers, server_ids=None):
    """An hccl_tools-style rank table (test_scripts.rank_table) -> its path as a string."""
    return str(rank_table(path, servers, server_ids))


@pytest.mark.parametrize("layout", [[8, 8], [8, 8, 8, 8], [4, 2, 4, 2]])
def test_every_server_starts_its_own_devices_with_global_ranks(tmp_path, layout):
    servers = tables.read_rank_table(write_table(tmp_path / "table.json", layout))
    total = sum(layout)
    seen = []
    for index, count in enumerate(layout):
        server, how = tables.select_server(servers, str(index))
        assert server.index == index and how == f"SERVER_ID={index}"
        plans = processes.plan_ranks(servers, server, range(16))
        first = sum(layout[:index])
        assert [p["device_id"] for p in plans] == list(range(count))
        assert [p["rank_id"] for p in plans] == list(range(first, first + count))
        for plan in plans:
            assert plan["env"] == {"RANK_SIZE": str(total), "DEVICE_NUM": str(count), "RANK_ID": str(plan["rank_id"]),
                                   "DEVICE_ID": str(plan["device_id"]), "SERVER_ID": str(index)}
        seen += [p["rank_id"] for p in plans]
    assert sorted(seen) == list(range(total))  # every rank on exactly one server


def test_server_found_by_its_server_id_or_by_this_machines_address(tmp_path):
    servers = tables.read_rank_table(write_table(tmp_path / "t.json", [2, 2, 2, 2]))
    assert tables.select_server(servers, "10.0.0.3")[0].index == 3
    server, how = tables.select_server(servers, None, addresses={"127.0.0.1", "10.0.0.2"})
    assert server.index == 2 and how == "its address 10.0.0.2"
    with pytest.raises(LaunchError, match=r"this machine \(127.0.0.1\) is none of the 4 servers .*give SERVER_ID"):
        tables.select_server(servers, None, addresses={"127.0.0.1"})
    with pytest.raises(LaunchError, match="matches 2 servers"):
        tables.select_server(servers, "", addresses={"10.0.0.1", "10.0.0.2"})
    with pytest.raises(LaunchError, match=r"SERVER_ID=4 is neither a position 0..3"):
        tables.select_server(servers, "4")
    # the real address lookup: this machine's loopback address names server 1 of this table
    servers = tables.read_rank_table(write_table(tmp_path / "lo.json", [2, 2], ["198.51.100.7", "127.0.0.1"]))
    assert "127.0.0.1" in tables.local_addresses()
    assert tables.select_server(servers)[0].index == 1
    # one server: no address needed (as before multi-server support)
    single = tables.read_rank_table(write_table(tmp_path / "one.json", [8], ["198.51.100.7"]))
    assert tables.select_server(single, None, addresses=set()) == (single[0], "the table's only server")


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ({"version": "1.0"}, "has no server_list"),
    ({"server_list": [{"server_id": "a", "device": []}]}, "server 0 has no devices"),
    ({"server_list": [{"device": [{"device_id": "0"}]}]}, "lacks device_id or rank_id"),
    ({"server_list": [{"device": [{"device_id": "x", "rank_id": "0"}]}]}, "device_id of server 0 is not"),
    ({"server_list": [{"device": [{"device_id": "0", "rank_id": "0"}]},
                      {"device": [{"device_id": "0", "rank_id": "0"}]}]}, "rank_id 0 appears twice"),
    ({"server_list": [{"device": [{"device_id": "0", "rank_id": "0"}, {"device_id": "0", "rank_id": "1"}]}]},
     "lists a device_id twice"),
    ({"server_list": [{"device": [{"device_id": "0", "rank_id": "0"}, {"device_id": "1", "rank_id": "2"}]}]},
     r"rank ids must be 0..1, missing \[1\]"),
    ({"server_count": "2", "server_list": [{"device": [{"device_id": "0", "rank_id": "0"}]}]},
     "server_count is 2 but server_list has 1"),
])
def test_unusable_rank_tables_are_one_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(LaunchError, match=message) as err:
        tables.read_rank_table(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_cpu_shares_come_from_the_allowed_cpus():
    assert processes.cpu_shares({4, 5, 6, 7}, 2) == [[4, 5], [6, 7]]
    assert processes.cpu_shares({0, 1}, 4) == [[0], [1], [0], [1]]  # more ranks than CPUs: shared, none idle
    assert processes.cpu_shares(range(24), 8) == [list(range(i * 3, i * 3 + 3)) for i in range(8)]
    assert processes.cpu_shares({3, 9, 10}, 1) == [[3, 9, 10]]
    assert processes.cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    with pytest.raises(LaunchError):
        processes.cpu_shares(set(), 1)


def test_arguments_split_into_positionals_launcher_options_and_flags():
    pos, opts, flags = arguments.split_args(["a", "b", "--server_id=1", "--epochs=3", "--dry_run"],
                                         ("server_id", "dry_run"))
    assert pos == ["a", "b"] and opts == {"server_id": "1", "dry_run": "True"} and flags == ["--epochs=3"]
    with pytest.raises(LaunchError, match="positional arguments come first"):
        arguments.split_args(["--epochs=3", "a"], ())
    with pytest.raises(LaunchError, match="are --key=value"):
        arguments.split_args(["--epochs", "3"], ())
    names = ["TRAIN_IMG_DIR", "TRAIN_ANN_FILE", "PRETRAINED_BACKBONE", "CONFIG_PATH"]
    assert arguments.assign_optional(["configs/x.yaml"], names) == {"CONFIG_PATH": "configs/x.yaml"}
    assert arguments.assign_optional(["img", "ann.json", "none", "cfg"], names) == dict(
        zip(names, ["img", "ann.json", "none", "cfg"]))
    assert arguments.assign_optional(["img", "c.yml"], names) == {"TRAIN_IMG_DIR": "img", "CONFIG_PATH": "c.yml"}
    with pytest.raises(LaunchError, match="too many arguments: extra"):
        arguments.assign_optional(["a", "b", "c", "d", "extra"], names)


def test_global_batch_must_split_over_the_devices():
    from src.config import load_config

    cfg = load_config([])
    assert arguments.batch_flags({}, [], cfg, 8) == ([], cfg.batch_size, cfg.batch_size * 8)
    assert arguments.batch_flags({"global_batch": "16"}, [], cfg, 4) == (["--batch_size=4"], 4, 16)
    with pytest.raises(LaunchError, match="the global batch 16 cannot be split over 3 devices"):
        arguments.batch_flags({"global_batch": "16"}, [], cfg, 3)
    with pytest.raises(LaunchError, match="not both"):
        arguments.batch_flags({"global_batch": "16"}, ["--batch_size=2"], cfg, 8)


def msrun_args(tmp_path, *extra):
    img = tmp_path / "img"
    img.mkdir(exist_ok=True)
    ann = tmp_path / "ann.json"
    ann.write_text("{}")
    return ["CPU", "2", str(img), str(ann), str(tmp_path / "out"), "none",
            os.path.join(ROOT, "configs", "synthetic_cpu.yaml"), *extra]


def test_msrun_command_for_one_and_several_nodes(tmp_path, monkeypatch):
    for var in ("NODE_NUM", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOBAL_BATCH"):
        monkeypatch.delenv(var, raising=False)
    command, lines, out_dir, dry = commands.msrun_plan(msrun_args(tmp_path, "--epochs=1"))
    assert command[:8] == ["msrun", "--worker_num=2", "--local_worker_num=2", "--node_rank=0",
                           "--master_addr=127.0.0.1", "--master_port=8118",
                           f"--log_dir={tmp_path / 'out' / 'msrun_log'}", "--join=True"]
    assert command[8] == os.path.join(ROOT, "train.py") and command[-1] == "--epochs=1"
    assert not dry and out_dir == str(tmp_path / "out")
    assert "--pretrained=False" in command and f"--output_dir={tmp_path / 'out'}" in command
    assert "global batch 8" in lines[1]  # synthetic_cpu.yaml: batch 4 per device, 2 devices

    command, lines, _, _ = commands.msrun_plan(msrun_args(tmp_path, "--node_num=3", "--node_rank=2",
                                                        "--master_addr=10.1.2.3", "--global_batch=12"))
    assert command[1:6] == ["--worker_num=6", "--local_worker_num=2", "--node_rank=2", "--master_addr=10.1.2.3",
                            "--master_port=8118"]
    assert "--batch_size=2" in command and "--node_num=3" not in command
    assert lines[0].startswith("msrun: node 2 of 3, 2 CPU workers here (ranks 4-5 of 6), master 10.1.2.3:8118")
    monkeypatch.setenv("NODE_NUM", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.9.9.9")
    monkeypatch.setenv("MASTER_PORT", "9000")
    command, _, _, _ = commands.msrun_plan(msrun_args(tmp_path))
    assert command[1:6] == ["--worker_num=4", "--local_worker_num=2", "--node_rank=1", "--master_addr=10.9.9.9",
                            "--master_port=9000"]
    assert commands.msrun_plan(msrun_args(tmp_path, "--node_rank=0"))[0][3] == "--node_rank=0"  # flag over env


@pytest.mark.parametrize("extra, env, message", [
    (["--node_num=2"], {}, "MASTER_ADDR (--master_addr, the address of node 0) is required with NODE_NUM=2"),
    (["--node_num=2", "--node_rank=2", "--master_addr=10.0.0.1"], {}, "NODE_RANK must be below NODE_NUM=2: 2"),
    ([], {"NODE_NUM": "0"}, "NODE_NUM (--node_num) must be an integer >= 1: 0"),
    ([], {"MASTER_PORT": "http"}, "MASTER_PORT (--master_port) must be an integer >= 1024"),
    (["--global_batch=6", "--node_num=2", "--master_addr=10.0.0.1"], {},
     "the global batch 6 cannot be split over 4 devices"),
    (["--output_dir=/elsewhere"], {}, "OUTPUT_DIR and --output_dir both given"),
    (["--no_such_key=1"], {}, "--no_such_key: unknown option"),
])
def test_msrun_refuses_bad_node_options(tmp_path, monkeypatch, extra, env, message):
    for var in ("NODE_NUM", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOBAL_BATCH"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LaunchError) as err:
        commands.msrun_plan(msrun_args(tmp_path, *extra))
    assert message in str(err.value)
