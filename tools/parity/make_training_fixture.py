"""Record torchvision's FCOS trained for a few SGD steps: the training-parity fixture.

Side tool, run with the torchvision side environment (never a product dependency):

    .venv-tv/bin/python tools/parity/make_training_fixture.py \\
        --fixture-dir ../shared/parity/r18_fpn64 --out-dir tests/fixtures/parity/r18_fpn64

It rebuilds torchvision's FCOS of the parity fixture (torchvision_fcos.py) with the fixture's
initial weights, and trains it on the fixture's preprocessed batch (batch_input) and GT - the
same batch every step, preprocessing not involved - with our recipe's optimiser written in torch:

- SGD, momentum (torch.optim.SGD: buf = m*buf + g, p -= lr*buf, dampening 0), weight decay added
  to the gradient after clipping, only on parameters with ndim > 1 unless --weight-decay-norm-bias
  (our split_decay_params; torchvision's reference train.py decays every parameter);
- the learning rate for `lr_base_batch` images scaled linearly to the batch; a linear warmup from
  warmup_ratio over warmup_iters steps (torch LinearLR) times a step decay by lr_gamma at the
  lr_steps epochs (torch MultiStepLR), chained;
- gradients clipped to grad_clip_norm (torch clip_grad_norm_: factor max_norm / (norm + 1e-6),
  at most 1) over all trained parameters;
- the stem and layer1 frozen (our freeze_stage_1; torchvision's default trainable_backbone_layers=3
  freezes the same layers); BatchNorm frozen (the fixture's model).

Writes training.npz - losses (steps, 3) per step before its update (classification,
bbox_regression, bbox_ctrness), lr (steps,), grad_norm (steps,) before clipping, and
final:<torchvision name> the weights after the last step of every parameter the fixture has a
grad: array for (above --max-stored elements, every k-th output channel only: array[::k], which
keeps each array's rank, so the converter's name rules apply to the stored arrays) - and
training.json (the recipe, what was stored, versions, and how far a float64 run of the same
steps drifts from this float32 one: a measure of the round-off that training amplifies).
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchvision_fcos  # noqa: E402  (imports torch, torchvision through the CPU shim)
import torch  # noqa: E402
import torchvision  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRAD_PREFIX = "grad:"
FINAL_PREFIX = "final:"
FROZEN_STAGE_1 = ("backbone.body.conv1.", "backbone.body.bn1.", "backbone.body.layer1.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixture-dir", default=os.path.normpath(os.path.join(ROOT, "..", "shared", "parity",
                                                                                "r18_fpn64")))
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "tests", "fixtures", "parity", "r18_fpn64"))
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--base-lr", type=float, default=0.01)
    parser.add_argument("--lr-base-batch", type=int, default=16)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--weight-decay-norm-bias", action="store_true")
    parser.add_argument("--lr-steps", type=int, nargs="*", default=[1], help="epochs of the step decay")
    parser.add_argument("--lr-gamma", type=float, default=0.1)
    parser.add_argument("--warmup-iters", type=int, default=6)
    parser.add_argument("--warmup-ratio", type=float, default=1.0 / 3)
    parser.add_argument("--grad-clip-norm", type=float, default=7.0)
    parser.add_argument("--no-freeze-stage-1", dest="freeze_stage_1", action="store_false")
    parser.add_argument("--max-stored", type=int, default=65536,
                        help="final weights of a larger parameter are stored as array[::k] (every k-th output "
                             "channel), k = ceil(size / this)")
    parser.add_argument("--skip-float64", action="store_true", help="do not measure the float64 drift")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def reference_lr(args, step, batch):
    """Our build_lr_schedule's formula (step schedule with linear warmup), in float64."""
    peak = args.base_lr * batch / args.lr_base_batch
    decays = sum(step // args.steps_per_epoch >= boundary for boundary in args.lr_steps)
    alpha = min(step / args.warmup_iters, 1.0) if args.warmup_iters > 0 else 1.0
    return peak * args.lr_gamma ** decays * (args.warmup_ratio * (1.0 - alpha) + alpha)


def train(args, manifest, state, arrays, dtype):
    """-> (losses (steps, 3), lr (steps,), grad_norm (steps,), {name: final weight}, trained names)."""
    model = torchvision_fcos.build_fcos(manifest, state).to(dtype)
    model.train()
    for name, param in model.named_parameters():
        if args.freeze_stage_1 and name.startswith(FROZEN_STAGE_1):
            param.requires_grad_(False)
    trained = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    params = [param for _, param in trained]
    decay = [p for p in params if args.weight_decay_norm_bias or p.ndim > 1]
    no_decay = [p for p in params if not (args.weight_decay_norm_bias or p.ndim > 1)]
    batch = arrays["batch_input"].shape[0]
    peak_lr = args.base_lr * batch / args.lr_base_batch
    groups = [{"params": decay, "weight_decay": args.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.SGD(groups, lr=peak_lr, momentum=args.momentum)
    schedulers = [torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[e * args.steps_per_epoch for e in args.lr_steps], gamma=args.lr_gamma)]
    if args.warmup_iters > 0:
        schedulers.insert(0, torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=args.warmup_ratio, end_factor=1.0, total_iters=args.warmup_iters))
    scheduler = torch.optim.lr_scheduler.ChainedScheduler(schedulers, optimizer=optimizer)

    images = torch.tensor(arrays["batch_input"], dtype=dtype)
    targets = torchvision_fcos.fixture_targets(arrays, dtype)
    steps = args.steps_per_epoch * args.epochs
    losses, lrs, norms = [], [], []
    for step in range(steps):
        started = time.perf_counter()
        lrs.append(optimizer.param_groups[0]["lr"])
        assert all(group["lr"] == lrs[-1] for group in optimizer.param_groups)
        terms = torchvision_fcos.losses_on_batch(model, images, targets)
        total = sum(terms[key] for key in torchvision_fcos.LOSS_KEYS)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if args.grad_clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        optimizer.step()
        scheduler.step()
        losses.append([float(terms[key].detach()) for key in torchvision_fcos.LOSS_KEYS])
        norms.append(float(norm))
        print(f"{str(dtype):14s} step {step + 1:2d}/{steps} lr {lrs[-1]:.6f} grad norm {norms[-1]:.4f} "
              f"losses {[round(x, 6) for x in losses[-1]]} ({time.perf_counter() - started:.1f} s)", flush=True)
    final = {name: param.detach().cpu().numpy() for name, param in model.named_parameters()}
    return np.array(losses), np.array(lrs), np.array(norms), final, [name for name, _ in trained]


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    manifest, state = torchvision_fcos.load_fixture(args.fixture_dir)
    expected_path = os.path.join(args.fixture_dir, "expected.npz")
    with np.load(expected_path) as data:
        arrays = {key: data[key] for key in data.files}
    steps = args.steps_per_epoch * args.epochs

    losses, lrs, norms, final, trained = train(args, manifest, state, arrays, torch.float32)
    for step, lr in enumerate(lrs):  # torch's chained schedulers against our formula
        want = reference_lr(args, step, arrays["batch_input"].shape[0])
        assert math.isclose(lr, want, rel_tol=1e-9), (step, lr, want)
    # The first step's losses are the parity fixture's (same model, same batch).
    first = [float(arrays[f"loss_{key}"]) for key in torchvision_fcos.LOSS_KEYS]
    assert np.allclose(losses[0], first, rtol=1e-6, atol=0), (losses[0], first)

    stored, subsample = {}, {}
    for key in arrays:
        if not key.startswith(GRAD_PREFIX):
            continue
        name = key[len(GRAD_PREFIX):]
        value = final[name].astype(np.float32)
        k = max(1, -(-value.size // args.max_stored))
        stored[FINAL_PREFIX + name] = value[::k]
        subsample[name] = k

    drift = None
    if not args.skip_float64:
        losses64, _, norms64, final64, _ = train(args, manifest, state, arrays, torch.float64)
        per_step = np.abs(losses - losses64) / np.abs(losses64)
        weight_drift = {}
        for name in subsample:
            delta64 = final64[name] - state[name].astype(np.float64)
            scale = float(np.abs(delta64).max())
            if scale > 0:
                weight_drift[name] = float(np.abs(final[name] - final64[name]).max()) / scale
        drift = {
            "what": "torch float32 (this fixture) against the same steps in torch float64",
            "loss_rel_err_per_step": per_step.max(axis=1).tolist(),
            "grad_norm_rel_err_per_step": (np.abs(norms - norms64) / norms64).tolist(),
            "final_weight_err_over_max_update": weight_drift,
        }
        print("float64 drift: largest loss rel err", float(per_step.max()),
              "largest weight err / max update", max(weight_drift.values()), flush=True)

    os.makedirs(args.out_dir, exist_ok=True)
    npz_path = os.path.join(args.out_dir, "training.npz")
    np.savez_compressed(npz_path, losses=losses.astype(np.float32), lr=lrs.astype(np.float64),
                        grad_norm=norms.astype(np.float32), **stored)
    recipe = {
        "steps": steps, "steps_per_epoch": args.steps_per_epoch, "epochs": args.epochs,
        "batch_size": int(arrays["batch_input"].shape[0]), "base_lr": args.base_lr,
        "lr_base_batch": args.lr_base_batch, "momentum": args.momentum, "weight_decay": args.weight_decay,
        "weight_decay_norm_bias": args.weight_decay_norm_bias, "lr_schedule": "step",
        "lr_steps": args.lr_steps, "lr_gamma": args.lr_gamma, "warmup_iters": args.warmup_iters,
        "warmup_ratio": args.warmup_ratio, "grad_clip_norm": args.grad_clip_norm,
        "freeze_stage_1": args.freeze_stage_1, "freeze_bn": True,
        "per_level_scales": "none in torchvision: ours must not train them (held at 1.0)",
    }
    record = {
        "about": "torchvision FCOS trained on the parity fixture's batch with our recipe's optimiser "
                 "(tools/parity/make_training_fixture.py)",
        "recipe": recipe,
        "loss_keys": list(torchvision_fcos.LOSS_KEYS),
        "trained_parameters": len(trained),
        "clipped_steps": int(np.sum(norms > args.grad_clip_norm)) if args.grad_clip_norm > 0 else 0,
        "stored_subsample": subsample,
        "source": {"manifest_seed": manifest["seed"], "expected_npz_sha256": file_digest(expected_path)},
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__},
        "float64_drift": drift,
    }
    with open(os.path.join(args.out_dir, "training.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"wrote {npz_path} ({os.path.getsize(npz_path) / 1e6:.2f} MB) and training.json; "
          f"{record['clipped_steps']} of {steps} steps clipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
