"""Numerical faults: a step whose loss or gradients are not finite changes nothing (weights,
momenta, optimiser step) and is logged with its step number; max_bad_steps such steps in a row
stop the run with a non-zero exit, and the last checkpoint it names is intact and loadable."""
import glob
import json
import logging
import os
import re
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import execution_mode, pycocotools_stats
from src.builder import build_inference, build_loss, build_model, load_network
from src.engine.checkpoint import load_checkpoint_file, load_weights, split_meta
from src.engine.train_step import FCOSWithLoss, TrainStep, build_optimizer
from src.engine.trainer import Trainer, TrainingStopped
from src.config import load_config
from tools.synthetic import make_synthetic_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_ARGS = ["--config_path=configs/synthetic_cpu.yaml", "--fpn_out_channels=32", "--num_head_convs=1",
              "--min_size=[64]", "--max_size=64"]
STEPS = 16  # length of the learning-rate schedule of the in-process step


def _batch(nan_pixel=False, boxes=None):
    """(images (2,3,64,64), gt_boxes (2,5,4), gt_labels (2,5), gt_mask (2,5)) as Tensors: one
    32x32 box per image, optionally extra GT rows ``boxes`` on image 0 and a NaN pixel."""
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    if nan_pixel:
        images[0, 1, 20, 30] = np.nan
    gt_boxes = np.zeros((2, 5, 4), np.float32)
    gt_boxes[:, 0] = [8, 8, 40, 40]
    gt_mask = np.zeros((2, 5), np.bool_)
    gt_mask[:, 0] = True
    for row, box in enumerate(boxes or [], start=1):
        gt_boxes[0, row], gt_mask[0, row] = box, True
    return Tensor(images), Tensor(gt_boxes), Tensor(np.zeros((2, 5), np.int32)), Tensor(gt_mask)


def _state(train_step):
    """Copies of every parameter of the step: network weights, momenta, the optimiser's step."""
    return {p.name: p.asnumpy().copy() for p in train_step.get_parameters()}


@pytest.fixture(scope="module")
def train_step():
    cfg = load_config(MODEL_ARGS)
    ms.set_seed(0)
    network = build_model(cfg)
    optimizer = build_optimizer(network.trainable_params(), np.full(STEPS, 0.01, np.float32), 0.9, 1e-4)
    step = TrainStep(FCOSWithLoss(network, build_loss(cfg, network)), optimizer)
    step.set_train(True)
    return step


def test_a_non_finite_step_changes_nothing(train_step, mode):
    before = _state(train_step)
    *losses, finite = train_step(*_batch(nan_pixel=True))
    assert not bool(finite.asnumpy())
    after = _state(train_step)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)

    *losses, finite = train_step(*_batch())
    assert bool(finite.asnumpy()) and all(np.isfinite(x.asnumpy()) for x in losses)
    updated = _state(train_step)
    assert int(updated["global_step"][0]) == int(before["global_step"][0]) + 1
    assert not np.array_equal(updated["head.cls_logits.weight"], before["head.cls_logits.weight"])
    assert not np.array_equal(updated["backbone.bn1.moving_mean"], before["backbone.bn1.moving_mean"])


def test_non_finite_gt_rows_get_no_location(train_step, mode):
    """GT rows with inf/NaN coordinates that reach the loss (the data pipeline drops them) are
    assigned to no location: the loss terms equal those of the batch without them (a rule that
    let an infinite box match the last level's unbounded range, or a NaN comparison pass,
    changes them), and the step stays finite and is applied."""
    rows = [[0, 0, np.inf, np.inf], [np.nan, 8, 40, 40], [-np.inf, 8, 40, 40], [8, 8, 40, np.nan]]
    clean = [x.asnumpy() for x in train_step.net_with_loss(*_batch())]
    with_rows = [x.asnumpy() for x in train_step.net_with_loss(*_batch(boxes=rows))]
    np.testing.assert_allclose(with_rows, clean, rtol=1e-6, atol=0)
    step_before = int(_state(train_step)["global_step"][0])
    *losses, finite = train_step(*_batch(boxes=rows))
    assert bool(finite.asnumpy()) and all(np.isfinite(x.asnumpy()) for x in losses)
    assert int(_state(train_step)["global_step"][0]) == step_before + 1


def _trainer(train_step, out_dir, max_bad_steps, save_ckpt_steps=0):
    return Trainer(train_step, steps_per_epoch=4, epochs=1, global_batch=2, lr_schedule=np.full(STEPS, 0.01),
                   output_dir=str(out_dir), log_interval=1, save_ckpt_steps=save_ckpt_steps, keep_ckpt_max=10,
                   max_bad_steps=max_bad_steps)


def _run(trainer, pattern):
    """Train one epoch of batches, 'n' a batch with a NaN pixel, '.' a clean one."""
    return trainer.run(lambda epoch, start: [_batch(nan_pixel=c == "n") for c in pattern[start:]])


def test_bad_steps_are_logged_and_only_a_streak_stops(train_step, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fcos"):
        trainer = _trainer(train_step, tmp_path / "apart", max_bad_steps=2)
        assert _run(trainer, "n.n.") is True
    skipped = [m for m in caplog.messages if "update skipped" in m]
    assert len(skipped) == 2
    assert skipped[0].startswith("step 1: non-finite loss or gradient") and skipped[0].endswith("(1 in a row)")
    assert skipped[1].startswith("step 3: non-finite loss or gradient") and skipped[1].endswith("(1 in a row)")
    assert trainer.bad_total == 2

    trainer = _trainer(train_step, tmp_path / "streak", max_bad_steps=2, save_ckpt_steps=1)
    with pytest.raises(TrainingStopped) as stop:
        _run(trainer, ".nn.")
    last = os.path.join(str(tmp_path / "streak"), "checkpoints", "fcos-0_2.ckpt")
    assert str(stop.value).startswith(f"2 non-finite steps in a row at step 3; last good checkpoint: {last}")
    # Step 2 was skipped, so its checkpoint holds the weights step 1 left, finite and loadable.
    after_1, _ = split_meta(load_checkpoint_file(last.replace("_2.ckpt", "_1.ckpt")))
    after_2, meta = split_meta(load_checkpoint_file(last))
    assert meta == {"epoch": 0, "step_in_epoch": 2, "global_step": 2, "global_batch": 2}
    for name, value in after_1.items():
        np.testing.assert_array_equal(after_2[name].asnumpy(), value.asnumpy(), err_msg=name)
    assert not glob.glob(os.path.join(str(tmp_path / "streak"), "checkpoints", "fcos-0_3.ckpt"))


@pytest.mark.slow
def test_train_py_stops_after_a_streak_with_its_checkpoint_intact(tmp_path):
    """A learning rate 1e12 times higher from epoch 2 on blows the weights up: every later step is
    non-finite, skipped and logged, and after max_bad_steps of them train.py exits with code 1,
    naming the checkpoint of epoch 1."""
    ann = make_synthetic_coco(str(tmp_path / "shapes"), 8, 64, 64, seed=3, max_objects=2)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "train.py", *MODEL_ARGS, f"--train_img_dir={tmp_path / 'shapes' / 'images'}",
         f"--train_ann_file={ann}", f"--output_dir={out}", "--batch_size=2", "--epochs=3",
         "--num_parallel_workers=1", "--warmup_iters=0", "--lr_steps=[1]", "--lr_gamma=1e12",
         "--max_bad_steps=3", "--log_interval=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    log = (out / "train.log").read_text()
    pattern = r"step (\d+): non-finite loss or gradient \(loss \S+\), update skipped \((\d+) in a row\)"
    skipped = [(int(step), int(in_row)) for step, in_row in re.findall(pattern, log)]
    first = skipped[0][0]
    assert 4 < first <= 8, "epoch 1 (normal learning rate) has no bad step, epoch 2 blows up"
    assert skipped == [(first, 1), (first + 1, 2), (first + 2, 3)]
    stop = re.search(r"ERROR 3 non-finite steps in a row at step (\d+); last good checkpoint: (\S+) ", log)
    assert stop and int(stop.group(1)) == first + 2
    epoch_1 = str(out / "checkpoints" / "fcos-1_4.ckpt")
    assert stop.group(2) == epoch_1 and glob.glob(str(out / "checkpoints" / "*.ckpt")) == [epoch_1]
    _, meta = split_meta(load_checkpoint_file(epoch_1))
    assert meta == {"epoch": 1, "step_in_epoch": 0, "global_step": 4, "global_batch": 2}
    # Loads into a network with every parameter present, of its shape and finite (else ValueError).
    load_weights(build_model(load_config(MODEL_ARGS)), epoch_1, strict_prefixes=("",))


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf, 1e20])
def test_squared_global_norm_flags_non_finite_and_clipping_scales(bad):
    """The one squared norm behind the finiteness guard and clipping, against NumPy (1e20: the
    sum overflows float32)."""
    from src.engine.train_step import clip_by_global_norm, squared_global_norm
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(shape).astype(np.float32) for shape in [(8, 3, 3, 3), (8,), ()]]
    if bad is not None:
        grads[0][1, 2, 0, 1] = bad
    squared = squared_global_norm(tuple(Tensor(g) for g in grads)).asnumpy()
    expected = sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads)
    if bad is None:
        np.testing.assert_allclose(squared, expected, rtol=1e-5)
        clipped = clip_by_global_norm(tuple(Tensor(g) for g in grads), 1.0, Tensor(squared))
        scale = 1.0 / (np.sqrt(expected) + 1e-6)
        for before, after in zip(grads, clipped):
            assert after.shape == before.shape
            np.testing.assert_allclose(after.asnumpy(), before * scale, rtol=1e-5, atol=1e-7)
    else:
        assert not np.isfinite(squared)


@pytest.mark.parametrize("bad", [None, np.nan, -np.inf, 1e20])
def test_native_squared_norm_is_squared_global_norm(ops_library, mode, bad):
    """The custom op (src/ops/global_norm.cc) against NumPy in float64, over tensors of many
    sizes (0-d, and larger than one task's chunk), and non-finite where the function is."""
    from src.ops.global_norm import NativeSquaredNorm
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(shape).astype(np.float32) for shape in [(), (5,), (3, 300001), (64, 32, 3, 3)]]
    if bad is not None:
        grads[2][1, 200000] = bad
    squared = NativeSquaredNorm()(tuple(Tensor(g) for g in grads)).asnumpy()
    assert squared.shape == () and squared.dtype == np.float32
    if bad is None:
        expected = sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads)
        np.testing.assert_allclose(squared, expected, rtol=1e-6)
    else:
        assert not np.isfinite(squared)


def _first_step(level):
    """One step of build_train_step at amp_level on the fixed batch, in PyNative mode -> (losses,
    {name: weight change})."""
    from src.builder import build_train_step
    cfg = load_config(MODEL_ARGS + [f"--amp_level={level}"])
    ms.set_seed(0)
    step, _ = build_train_step(cfg, build_model(cfg), steps_per_epoch=STEPS, group_size=1)
    before = _state(step)
    with execution_mode(ms.PYNATIVE_MODE):
        *losses, finite = step(*_batch())
    assert bool(finite.asnumpy())
    after = _state(step)
    return [float(x.asnumpy()) for x in losses], {name: after[name] - before[name] for name in before
                                                  if name.startswith(("backbone.", "fpn.", "head."))}


@pytest.fixture(scope="module")
def float32_step():
    return _first_step("O0")


@pytest.mark.parametrize("level", ["O2", "O3"])
def test_mixed_precision_step_agrees_with_the_float32_step(level, float32_step):
    """amp_level O2/O3 (float16 network, loss scaling, GroupNorm kept in float32): the same losses
    as O0 to float16 precision and weight updates pointing the same way. Mutations caught: a loss
    scale left in the gradients (updates 2^16 times too large), GroupNorm in float16 (losses off).
    In PyNative mode (no graph to compile; the modes agree, tests/test_parity_grad.py); O3 trains in
    graph mode below, through train.py."""
    (want_losses, want_delta), (losses, delta) = float32_step, _first_step(level)
    np.testing.assert_allclose(losses, want_losses, rtol=2e-2, atol=2e-3)
    for name in ("head.cls_tower.1.gamma", "head.cls_logits.weight", "fpn.output.0.weight"):
        a, b = delta[name].ravel().astype(np.float64), want_delta[name].ravel().astype(np.float64)
        assert np.linalg.norm(a) == pytest.approx(np.linalg.norm(b), rel=0.1), name
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.98, name


@pytest.mark.slow
def test_a_mixed_precision_run_trains_evaluates_and_exports(tmp_path):
    """train.py --amp_level=O3 (float16 everywhere but GroupNorm) writes a float32 checkpoint under
    the float network's names (not the mixed-precision wrapper's, not float16), which eval.py and
    export.py load strictly; the exported MindIR computes what the float network on it computes."""
    ann = make_synthetic_coco(str(tmp_path / "set"), 4, 64, 64, seed=1)
    images = str(tmp_path / "set" / "images")
    flags = [*MODEL_ARGS, "--amp_level=O3"]
    for script, args in (("train.py", ["--epochs=1", "--batch_size=2", f"--train_img_dir={images}",
                                       f"--train_ann_file={ann}", f"--output_dir={tmp_path / 'train'}"]),
                         ("eval.py", [f"--ckpt_file={tmp_path / 'train' / 'checkpoints' / 'fcos-1_2.ckpt'}",
                                      f"--val_img_dir={images}", f"--val_ann_file={ann}",
                                      f"--output_dir={tmp_path / 'eval'}"]),
                         ("export.py", [f"--ckpt_file={tmp_path / 'train' / 'checkpoints' / 'fcos-1_2.ckpt'}",
                                        f"--file_name={tmp_path / 'fcos'}", "--export_height=64", "--export_width=64",
                                        "--export_batch_size=1"])):
        done = subprocess.run([sys.executable, script, *flags, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{script}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    saved = load_checkpoint_file(str(tmp_path / "train" / "checkpoints" / "fcos-1_2.ckpt"))
    params, _ = split_meta(saved)
    cfg = load_config(flags + [f"--ckpt_file={tmp_path / 'train' / 'checkpoints' / 'fcos-1_2.ckpt'}"])
    network = load_network(cfg, portable=True)
    for param in network.get_parameters():  # (load_network loads strictly: every name is there)
        assert params[param.name].shape == param.shape and params[param.name].dtype == ms.float32, param.name
    result = json.load(open(tmp_path / "eval" / "eval_result.json", encoding="utf-8"))
    reference = pycocotools_stats(ann, result["detections"])
    assert result["AP"] == pytest.approx(reference["AP"], abs=1e-9)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    want = [t.asnumpy() for t in build_inference(cfg, network)(Tensor(x))]
    got = [t.asnumpy() for t in ms.nn.GraphCell(ms.load(str(tmp_path / "fcos.mindir")))(Tensor(x))]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)  # scores
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-3)  # boxes
