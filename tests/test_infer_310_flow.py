"""The deployment flow: preprocess.py -> exported MindIR (Python runner) -> postprocess.py gives the
COCO metrics of eval.py on the same checkpoint; run_infer_310.sh's argument checks. The C++
program (ascend310_infer/) is built and run in tests/test_cpp_infer.py; no C++ runtime that reads
MindSpore 2.10's MindIR installs here, so run_infer_310.sh runs the Python runner in this flow."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from src.data.coco import CocoDataset
from src.data.transforms import preprocess_image
from src.geometry import EvalGeometry
from src.deploy.contract import (IMAGES_DIR, INFO_FILE, read_result, result_path, write_export_info,
                                 write_preprocess_info)
from tools.synthetic import make_synthetic_coco

import postprocess
import preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_INFER = os.path.join(ROOT, "scripts", "run_infer_310.sh")
# A narrow ResNet-18 FCOS at 128x128: 40 training steps reach a clearly non-zero AP in ~30 s.
MODEL_ARGS = ["--config_path=configs/synthetic_cpu.yaml", "--fpn_out_channels=32", "--num_head_convs=2",
              "--min_size=[128]", "--max_size=128"]
TRAIN_ARGS = ["--max_gt_boxes=4", "--epochs=20", "--base_lr=0.02", "--warmup_iters=10", "--lr_steps=[18]",
              "--flip_prob=0.0", "--save_ckpt_epochs=20", "--log_interval=10"]
EXPORT_BATCH = 2  # 9 images: the runner's last batch is incomplete


RUNTIME_ENV = ("MINDSPORE_PATH", "LITE_HOME", "MS_LITE_HOME")


def script_env(output_dir, **extra):
    """Environment for run_infer_310.sh: no MindSpore C++ runtime location (so the C++ program does
    not build and the Python runner runs), this Python first on PATH, no build in the source tree."""
    env = {k: v for k, v in os.environ.items() if k not in RUNTIME_ENV}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(OUTPUT_DIR=str(output_dir), PYTHON=sys.executable, CPP_BUILD_DIR=str(output_dir / "cpp_build"),
               **extra)
    return env


def run(args, **kwargs):
    """Run a command in the repository root -> CompletedProcess (output captured as text)."""
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


def run_ok(args, **kwargs):
    result = run(args, **kwargs)
    assert result.returncode == 0, f"{args[:2]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """Train briefly (run_standalone_train.sh), evaluate with eval.py, export a MindIR and run
    scripts/run_infer_310.sh on CPU."""
    root = tmp_path_factory.mktemp("flow")
    ann_file = make_synthetic_coco(str(root / "shapes"), 9, 128, 128, seed=3, min_objects=1, max_objects=2)
    img_dir = str(root / "shapes" / "images")
    # trained by the users' script (DEVICE_TARGET IMG_DIR ANN_FILE OUTPUT_DIR CONFIG --key=value...)
    config, model_flags = MODEL_ARGS[0].split("=", 1)[1], MODEL_ARGS[1:]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    run_ok(["bash", os.path.join(ROOT, "scripts", "run_standalone_train.sh"), "CPU", img_dir, ann_file,
            str(root / "train"), config, *model_flags, *TRAIN_ARGS], env=env)
    ckpt = str(root / "train" / "checkpoints" / "fcos-20_40.ckpt")
    run_ok([sys.executable, "eval.py", *MODEL_ARGS, f"--ckpt_file={ckpt}", f"--val_img_dir={img_dir}",
            f"--val_ann_file={ann_file}", f"--output_dir={root / 'eval'}"])
    run_ok([sys.executable, "export.py", *MODEL_ARGS, f"--ckpt_file={ckpt}", f"--file_name={root / 'fcos'}",
            "--export_height=128", "--export_width=128", f"--export_batch_size={EXPORT_BATCH}"])
    script = run_ok(["bash", RUN_INFER, str(root / "fcos.mindir"), img_dir, ann_file, "y", "CPU", "0"],
                    env=script_env(root / "infer"))
    return {"root": root, "ann_file": ann_file, "img_dir": img_dir, "infer": root / "infer",
            "export_info": str(root / "fcos.json"), "script_stdout": script.stdout}


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_exported_flow_matches_eval(flow):
    expected = read_json(flow["root"] / "eval" / "eval_result.json")
    got = read_json(flow["infer"] / "eval_result.json")
    assert sorted(got) == sorted(expected)
    assert expected["AP"] > 0.1, "the briefly trained checkpoint should detect the shapes"
    for key in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):
        assert got[key] == pytest.approx(expected[key], abs=0.002), key
    assert abs(got["num_detections"] - expected["num_detections"]) <= 2
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in flow["script_stdout"]
    assert "NN inference cost average time" in flow["script_stdout"]
    assert "ascend310_infer did not build: ascend310_infer: no MindSpore C++ inference runtime found" \
        in flow["script_stdout"]
    assert "inference runs with: the Python MindIR runner, python -m src.deploy.runner (CPU 0)" in flow["script_stdout"]
    timing = read_json(flow["infer"] / "result_Files" / "infer_time.json")
    assert timing["images"] == 9 and timing["batch_size"] == EXPORT_BATCH
    assert timing["mean_ms_per_image"] > 0


def test_runner_writes_one_result_per_image(flow):
    """Every image, the zero-filled last batch's one included, has its own K candidates."""
    info = read_json(flow["infer"] / "preprocess_Result" / INFO_FILE)
    assert [e["name"] for e in info["images"]] == sorted(e["name"] for e in info["images"])
    export = read_json(flow["export_info"])
    k, num_classes = export["outputs"][1]["shape"][1], export["model"]["class_num"]
    all_scores = []
    for entry in info["images"]:
        boxes, scores, labels = read_result(flow["infer"] / "result_Files", entry["name"], k)
        assert boxes.shape == (k, 4) and np.all((scores > 0) & (scores < 1))
        assert labels.min() >= 0 and labels.max() < num_classes
        all_scores.append(scores)
    assert len(info["images"]) % EXPORT_BATCH == 1
    assert not np.array_equal(all_scores[-1], all_scores[-2]), "the last image got another slot's outputs"


def test_reuse_preprocessed_data(flow, tmp_path):
    """NEED_PREPROCESS=n runs on the bins of an earlier run and gives the same metrics."""
    shutil.copytree(flow["infer"] / "preprocess_Result", tmp_path / "preprocess_Result")
    # DEVICE_ID left out: it is optional (0).
    result = run(["bash", RUN_INFER, str(flow["root"] / "fcos.mindir"), flow["img_dir"], flow["ann_file"],
                  "n", "CPU"], env=script_env(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:]
    assert "preprocessing images" not in result.stdout
    assert read_json(tmp_path / "eval_result.json")["AP"] == read_json(flow["infer"] / "eval_result.json")["AP"]


def test_postprocess_names_a_missing_result(flow, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(flow["infer"] / "result_Files", results)
    os.remove(result_path(results, "000004", 1))
    with pytest.raises(SystemExit) as exit_info:
        postprocess.main([f"--result_dir={results}", f"--export_info={flow['export_info']}",
                          f"--info_file={flow['infer'] / 'preprocess_Result' / INFO_FILE}",
                          f"--val_ann_file={flow['ann_file']}", f"--output_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert "000004_1.bin" in capsys.readouterr().err
    assert not (tmp_path / "eval_result.json").exists()


def _edited_info(flow, tmp_path, edit):
    """A copy of the flow's preprocess_info.json changed by edit(info) -> its path."""
    info = read_json(flow["infer"] / "preprocess_Result" / INFO_FILE)
    edit(info)
    write_preprocess_info(str(tmp_path), info)
    return tmp_path / INFO_FILE


def test_postprocess_refuses_images_the_annotations_lack(flow, tmp_path, capsys):
    def add_unknown(info):
        info["images"].append(dict(info["images"][0], image_id=987654))

    info_file = _edited_info(flow, tmp_path, add_unknown)
    args = [a if not a.startswith("--info_file=") else f"--info_file={info_file}"
            for a in _postprocess_args(flow, flow["ann_file"], tmp_path / "post")]
    with pytest.raises(SystemExit) as exit_info:
        postprocess.main(args)
    assert exit_info.value.code == 2
    assert f"--info_file: 1 images (e.g. id 987654) are not in {flow['ann_file']}" in capsys.readouterr().err
    assert not (tmp_path / "post" / "eval_result.json").exists()


def test_postprocess_scores_only_the_images_preprocess_wrote_and_says_so(flow, tmp_path, capsys):
    """Images preprocess.py skipped are counted in its info file: postprocess warns and scores the
    others only (scoring a skipped image as 'nothing detected' would lower every metric)."""
    dropped = []

    def skip_last(info):
        dropped.append(info["images"].pop())
        info["num_skipped"] += 1

    info_file = _edited_info(flow, tmp_path, skip_last)
    args = [a if not a.startswith("--info_file=") else f"--info_file={info_file}"
            for a in _postprocess_args(flow, flow["ann_file"], tmp_path / "post")]
    postprocess.main(args)
    assert "1 images were skipped by preprocess.py and are not scored" in capsys.readouterr().out
    got = read_json(tmp_path / "post" / "eval_result.json")
    assert got["num_images"] == len(read_json(flow["ann_file"])["images"]) - 1
    assert all(d["image_id"] != dropped[0]["image_id"] for d in got["detections"])


def test_preprocess_names_what_an_export_info_lacks(flow, tmp_path, capsys):
    export = read_json(flow["export_info"])
    del export["preprocess"]["max_size"]
    write_export_info(str(tmp_path / "fcos.json"), export)
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main([f"--val_img_dir={flow['img_dir']}", f"--val_ann_file={flow['ann_file']}",
                         f"--output_dir={tmp_path / 'pre'}", f"--export_info={tmp_path / 'fcos.json'}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"--export_info: {tmp_path / 'fcos.json'} has no preprocess 'max_size'")


def _annotations_with_categories(flow, tmp_path, num_categories):
    """The flow's annotation file cut to its first num_categories categories -> path."""
    data = read_json(flow["ann_file"])
    data["categories"] = [{"id": i + 1, "name": f"c{i}"} for i in range(num_categories)]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] <= num_categories]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(data))
    return ann_file


def _postprocess_args(flow, ann_file, output_dir):
    return [f"--result_dir={flow['infer'] / 'result_Files'}", f"--export_info={flow['export_info']}",
            f"--info_file={flow['infer'] / 'preprocess_Result' / INFO_FILE}",
            f"--val_ann_file={ann_file}", f"--output_dir={output_dir}"]


def test_postprocess_rejects_more_categories_than_classes(flow, tmp_path, capsys):
    ann_file = _annotations_with_categories(flow, tmp_path, 4)
    with pytest.raises(SystemExit) as exit_info:
        postprocess.main(_postprocess_args(flow, ann_file, tmp_path))
    assert exit_info.value.code == 2
    assert "has 4 categories, more than the model's class_num=3" in capsys.readouterr().err
    assert not (tmp_path / "eval_result.json").exists()


def test_fewer_categories_are_scored_alike_by_eval_and_postprocess(flow, tmp_path, capsys):
    """One policy: detections of labels without a category are left out, with a warning."""
    ann_file = _annotations_with_categories(flow, tmp_path, 1)
    postprocess.main(_postprocess_args(flow, ann_file, tmp_path / "post"))
    assert "labels 1..2 have no category (never trained, never scored)" in capsys.readouterr().out
    got = read_json(tmp_path / "post" / "eval_result.json")
    ckpt = flow["root"] / "train" / "checkpoints" / "fcos-20_40.ckpt"
    result = run_ok([sys.executable, "eval.py", *MODEL_ARGS, f"--ckpt_file={ckpt}", f"--val_img_dir={flow['img_dir']}",
                     f"--val_ann_file={ann_file}", f"--output_dir={tmp_path / 'eval'}"])
    assert "labels 1..2 have no category (never trained, never scored)" in result.stdout + result.stderr
    expected = read_json(tmp_path / "eval" / "eval_result.json")
    assert {d["category_id"] for d in got["detections"]} == {1}
    for key in ("AP", "AP50", "AR100"):
        assert got[key] == pytest.approx(expected[key], abs=0.002), key


def test_preprocess_skips_bad_images_and_shrinks_other_orientation(tmp_path):
    ann_file = make_synthetic_coco(str(tmp_path / "set"), 4, 96, 64, seed=1)
    img_dir = tmp_path / "set" / "images"
    data = read_json(ann_file)
    with open(img_dir / data["images"][1]["file_name"], "wb") as f:
        f.write(b"not an image")
    os.remove(img_dir / data["images"][2]["file_name"])
    out = tmp_path / "pre"
    os.makedirs(out / IMAGES_DIR)
    (out / IMAGES_DIR / "999999.bin").write_bytes(b"stale")
    # A landscape export shape for portrait 96x64 images at min_size 64: 96x64 must shrink to 64x42.
    preprocess.main([f"--val_img_dir={img_dir}", f"--val_ann_file={ann_file}", f"--output_dir={out}",
                     "--min_size=[64]", "--max_size=96", "--export_height=64", "--export_width=96"])
    info = read_json(out / INFO_FILE)
    assert info["num_images"] == 2 and info["num_skipped"] == 2 and info["num_shrunk_to_fit"] == 2
    assert [s["image_id"] for s in info["skipped"]] == [data["images"][1]["id"], data["images"][2]["id"]]
    assert sorted(os.listdir(out / IMAGES_DIR)) == ["000000.bin", "000001.bin"]
    coco = CocoDataset(str(img_dir), ann_file)
    for entry in info["images"]:
        assert entry["orig_hw"] == [96, 64] and entry["resized_hw"] == [64, 42]
        expected, _ = preprocess_image(coco.load_image(entry["image_id"]), EvalGeometry.make(64, 96), (64, 96))
        got = np.fromfile(out / IMAGES_DIR / f"{entry['name']}.bin", np.float32).reshape(3, 64, 96)
        np.testing.assert_array_equal(got, expected)


def test_preprocess_rejects_a_shape_not_multiple_of_32(tmp_path, capsys):
    ann_file = make_synthetic_coco(str(tmp_path / "set"), 1, 64, 64, seed=1)
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main([f"--val_img_dir={tmp_path / 'set' / 'images'}", f"--val_ann_file={ann_file}",
                         f"--output_dir={tmp_path / 'pre'}", "--export_height=100"])
    assert exit_info.value.code == 2
    assert "--export_height=100: must be a positive multiple of 32" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    ([], "Usage: bash scripts/run_infer_310.sh"),
    (["{mindir}", "{folder}", "{mindir}", "y"], "Usage: bash scripts/run_infer_310.sh"),
    (["{mindir}", "{folder}", "{mindir}", "y", "CPU", "0", "extra"], "Usage: bash scripts/run_infer_310.sh"),
    (["missing.mindir", ".", "ann.json", "y", "CPU", "0"], "MINDIR_PATH is not a file"),
    (["{mindir}", "{folder}", "{mindir}", "y", "NPU", "0"], "DEVICE_TARGET must be Ascend, GPU or CPU"),
    (["{mindir}", "{folder}", "{mindir}", "y", "CPU", "x"], "DEVICE_ID must be a number"),
    (["{mindir}", "{folder}/nothing", "{mindir}", "y", "CPU"], "DATA_PATH is not a folder"),
    (["{mindir}", "{folder}", "{mindir}", "maybe", "CPU", "0"], "NEED_PREPROCESS must be y or n"),
    # ModelZoo's order: NEED_PREPROCESS before DEVICE_TARGET (the old order is rejected).
    (["{mindir}", "{folder}", "{mindir}", "CPU", "y", "0"], "DEVICE_TARGET must be Ascend, GPU or CPU, got 'y'"),
])
def test_run_infer_310_checks_arguments(tmp_path, args, message):
    mindir = tmp_path / "m.mindir"
    mindir.write_bytes(b"")
    (tmp_path / "m.json").write_text("{}")
    args = [a.format(mindir=mindir, folder=tmp_path) for a in args]
    result = run(["bash", RUN_INFER, *args], env=script_env(tmp_path / "out"))
    assert result.returncode == 1
    assert message in result.stdout
    assert "Usage: bash scripts/run_infer_310.sh [MINDIR_PATH] [DATA_PATH] [ANN_FILE] [NEED_PREPROCESS] " \
        "[DEVICE_TARGET] [DEVICE_ID(optional, 0)]" in result.stdout
    assert not (tmp_path / "out").exists(), "nothing is written before the arguments are checked"


def test_run_infer_310_checks_infer_runner(tmp_path):
    mindir = tmp_path / "m.mindir"
    mindir.write_bytes(b"")
    (tmp_path / "m.json").write_text("{}")
    result = run(["bash", RUN_INFER, str(mindir), str(tmp_path), str(mindir), "y", "CPU"],
                 env=script_env(tmp_path / "out", INFER_RUNNER="c++"))
    assert result.returncode == 1
    assert "error: INFER_RUNNER must be auto, cpp or python, got 'c++'" in result.stdout
    assert not (tmp_path / "out").exists()
