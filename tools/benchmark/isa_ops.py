"""What lifting MindSpore's oneDNN ISA cap does to the network's other oneDNN-backed CPU ops.

src/__init__.py caps oneDNN at AVX2 (MindSpore's own NCHW convolutions need it) and
src/ops/backend.py lifts the cap when every convolution runs as a oneDNN custom op. The cap is
process-wide, so this times, in two child processes (cap on, cap lifted), forward and
forward+backward of each other kind of op an FCOS training step runs on CPU, at the shapes of
R50-FPN 800x1216 batch 1 (or --scale 0.5 for quicker numbers):

    python -m tools.benchmark.isa_ops [--scale 0.5] [--steps 5]

Prints one table (best of --steps, milliseconds) and one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cases(scale):
    """-> [(name, builder(ms modules) -> (cell, input shapes))] at R50-FPN 800x1216 x scale."""
    def hw(h, w):
        return max(int(h * scale), 2), max(int(w * scale), 2)

    h2, w2 = hw(400, 608)
    h4, w4 = hw(200, 304)
    h8, w8 = hw(100, 152)

    def batchnorm(nn, norm):
        return nn.BatchNorm2d(256), [(1, 256, h4, w4)]

    def frozen_batchnorm(nn, norm):
        return norm.FrozenBatchNorm2d(256), [(1, 256, h4, w4)]

    def maxpool(nn, norm):
        return nn.MaxPool2d(3, 2, pad_mode="same"), [(1, 64, h2, w2)]

    def relu(nn, norm):
        return nn.ReLU(), [(1, 256, h4, w4)]

    def group_norm(nn, norm):
        return norm.GroupNorm(32, 256), [(1, 256, h8, w8)]

    def matmul(nn, norm):
        return nn.Dense(1024, 1024, has_bias=False), [(h8 * 16, 1024)]

    return [("BatchNorm2d (training)", batchnorm), ("FrozenBatchNorm2d", frozen_batchnorm),
            ("MaxPool2d 3x3/2", maxpool), ("ReLU", relu), ("GroupNorm (src.model.norm)", group_norm),
            ("MatMul (Dense)", matmul)]


def run_child(scale, steps):
    """Time every case in this process (ISA as the environment left it) -> {name: (forward, gradient) ms}."""
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, nn

    from src.model import norm
    from tools.benchmark.common import best_ms

    ms.set_context(mode=ms.GRAPH_MODE)
    results = {}
    for name, make in cases(scale):
        cell, shapes = make(nn, norm)
        inputs = [Tensor(np.random.default_rng(0).standard_normal(s).astype(np.float32)) for s in shapes]
        grad = ms.jit(ms.grad(cell, grad_position=tuple(range(len(inputs)))))

        def forward():
            cell(*inputs).asnumpy()

        def backward():
            out = grad(*inputs)
            (out[0] if isinstance(out, tuple) else out).asnumpy()

        results[name] = (best_ms(forward, steps, 1), best_ms(backward, steps, 1))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="spatial scale of the R50-FPN 800x1216 shapes")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", choices=("capped", "lifted"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import src  # noqa: F401  (the AVX2 default, before mindspore)
        if args.child == "lifted":
            from src.ops.backend import lift_isa_cap
            lift_isa_cap()
        print(json.dumps(run_child(args.scale, args.steps)))
        return
    table = {}
    for mode in ("capped", "lifted"):
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
        done = subprocess.run([sys.executable, "-m", "tools.benchmark.isa_ops", "--child", mode, "--scale",
                               str(args.scale), "--steps", str(args.steps)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True, check=True)
        table[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'op':28} {'AVX2 fwd':>9} {'lifted fwd':>10} {'AVX2 grad':>9} {'lifted grad':>11}  (ms, best of {args.steps})")
    for name in table["capped"]:
        (cf, cb), (lf, lb) = table["capped"][name], table["lifted"][name]
        print(f"{name:28} {cf:9.2f} {lf:10.2f} {cb:9.2f} {lb:11.2f}")
    print(json.dumps({"scale": args.scale, "steps": args.steps, **table}))


if __name__ == "__main__":
    main()
