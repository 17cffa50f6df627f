"""Configuration: YAML + command-line overrides, and one-line errors with a non-zero exit."""
import os
import subprocess
import sys

import pytest
import yaml

from src.config import DEFAULT_CONFIG, ConfigError, Flag, load_config, range_test, schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL_KEYS = ("pretrained", "freeze_stage_1", "freeze_bn", "fpn_out_channels", "use_p5", "class_num",
                 "use_GN_head", "prior", "add_centerness", "cnt_on_reg", "strides", "limit_range",
                 "score_threshold", "nms_iou_threshold", "max_detection_boxes_num")
CONTRACT_FLAGS = ("device_target", "train_img_dir", "train_ann_file", "val_img_dir", "val_ann_file", "output_dir",
                  "backbone", "pretrained_backbone", "ckpt_file", "class_num")


def test_defaults_hold_the_original_fcos_values():
    cfg = load_config([])
    assert cfg.fpn_out_channels == 256 and cfg.use_p5 is True and cfg.class_num == 80
    assert cfg.strides == [8, 16, 32, 64, 128]
    assert cfg.limit_range == [[-1, 64], [64, 128], [128, 256], [256, 512], [512, 999999]]
    assert cfg.score_threshold == 0.05 and cfg.nms_iou_threshold == 0.6 and cfg.max_detection_boxes_num == 1000
    assert cfg.prior == 0.01


def test_every_key_has_help_and_overrides_of_each_type():
    with open(DEFAULT_CONFIG) as f:
        values, helps, _, ranges, groups = list(yaml.safe_load_all(f))
    assert set(values) == set(helps), set(values) ^ set(helps)
    assert set(ranges) <= set(values) and set(schema().group("run_only")) <= set(values)
    cfg = load_config(["--min_size=[640, 672]", "--freeze_bn=false", "--limit_range=[[0,1],[2,3]]",
                       "--base_lr=1", "--batch_size", "3", "--backbone=resnet18", "--pad_buckets=[[64,96]]"])
    assert cfg.min_size == [640, 672] and cfg.freeze_bn is False
    assert cfg.limit_range == [[0, 1], [2, 3]] and cfg.pad_buckets == [[64, 96]]
    assert cfg.base_lr == 1.0 and isinstance(cfg.base_lr, float) and cfg.batch_size == 3


def test_config_path_overlays_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("class_num: 3\nbackbone: resnet18\n")
    cfg = load_config([f"--config_path={path}", "--class_num=5"])
    assert cfg.backbone == "resnet18" and cfg.class_num == 5 and cfg.fpn_out_channels == 256
    path.write_text("no_such_key: 1\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config([f"--config_path={path}"])


@pytest.mark.parametrize("argv, key", [
    (["--no_such=1"], "--no_such"),
    (["--batch_size=two"], "--batch_size"),
    (["--backbone=vgg16"], "--backbone"),
    (["--strides=[8,x]"], "--strides"),
    (["--freeze_bn=perhaps"], "--freeze_bn"),
    (["--amp_level=O1"], "--amp_level"),  # MindSpore's O1 source rewrite cannot compile this network
    (["--config_path=/no/such.yaml"], "--config_path"),
])
def test_bad_values_name_the_key(argv, key):
    with pytest.raises(ConfigError, match=key):
        load_config(argv)


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_help_lists_every_parameter():
    out = _run("train.py", "--help")
    assert out.returncode == 0
    for key in ORIGINAL_KEYS + CONTRACT_FLAGS + ("config_path",):
        assert f"--{key}" in out.stdout, key


@pytest.mark.parametrize("args, needle", [
    (["--backbone=vgg"], "--backbone"),
    (["--train_img_dir=/no/such/dir", "--train_ann_file=/no/such.json"], "--train_img_dir"),
    (["--bogus=1"], "--bogus"),
])
def test_entry_point_errors_are_one_line(args, needle):
    out = _run("train.py", *args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("text, inside, outside", [
    ("> 0", [1e-9, 5], [0, -1]), (">= 0", [0, 3], [-1e-9]), ("[0, 1]", [0, 1, 0.5], [-0.1, 1.1]),
    ("(0, 1]", [1, 0.5], [0, 2]), ("[0, 1)", [0, 0.99], [1]), ("(0, 1)", [0.5], [0, 1])])
def test_schema_ranges(text, inside, outside):
    test = range_test(text)
    assert all(test(v) for v in inside) and not any(test(v) for v in outside)
    with pytest.raises(ValueError, match="not a range"):
        range_test("between 0 and 1")


def test_entry_point_flags_go_through_the_loader():
    flags = {"input": Flag([], "images", many=True, required=True), "threshold": Flag(0.3, "t"),
             "names": Flag("", "n")}
    cfg = load_config(["--input", "a.jpg", "b.jpg", "--threshold=0.5", "--batch_size=3"], flags=flags)
    assert cfg.input == ["a.jpg", "b.jpg"] and cfg.threshold == 0.5 and cfg.names == "" and cfg.batch_size == 3
    with pytest.raises(ConfigError, match="--threshold: expected a number, got 'high'"):
        load_config(["--input", "a.jpg", "--threshold=high"], flags=flags)
    with pytest.raises(ConfigError, match="--input: required, but empty"):
        load_config([], flags=flags)
    with pytest.raises(ConfigError, match="--export_info: unknown option"):
        load_config(["--export_info=x.json"])  # another entry point's flag


@pytest.mark.parametrize("documents, key", [
    ([{"conv_impl": "faster"}, {}, {"conv_impl": ["faster"]}], "conv_impl"),  # a new choice
    ([{"batch_size": 0}, {}, {}, {"batch_size": ">= 0"}], "batch_size"),      # a widened range
])
def test_a_user_file_cannot_change_choices_or_ranges(tmp_path, documents, key):
    """Mutation caught: a user file's third document merged into the allowed choices (validation
    bypassed)."""
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    with pytest.raises(ConfigError, match=f"allowed choices or ranges of {key} are default_config.yaml's"):
        load_config([f"--config_path={path}"])


@pytest.mark.parametrize("value", ["two", "-3", "9" * 30])
def test_a_bad_launcher_variable_is_one_line(monkeypatch, value):
    from src.utils.logs import launched_distributed

    monkeypatch.setenv("RANK_SIZE", value)
    with pytest.raises(ConfigError, match="environment variable RANK_SIZE="):
        launched_distributed()
