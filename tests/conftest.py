"""Test setup: CPU-friendly MindSpore settings and paths to the real fixtures."""
import contextlib
import importlib.util
import os
import sys

# Before mindspore is imported anywhere, and set here rather than left to src/__init__.py so that it
# counts as the user's choice and src/ops/backend.py keeps it: in-process tests mix MindSpore's
# Conv2D (exports, references) with the oneDNN custom ops, and the cap is process-wide.
# FCOS_TEST_LIFT_ISA=1 (test_onednn_conv's child run) leaves it to src, whose cap the oneDNN tests lift.
if os.environ.get("FCOS_TEST_LIFT_ISA") != "1":
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VENDORED_PARITY = os.path.join(ROOT, "tests", "fixtures", "parity", "r18_fpn64")
SHARED_PARITY = os.path.normpath(os.path.join(ROOT, "..", "shared", "parity", "r18_fpn64"))
DEEPFOREST_VOC = os.path.join(ROOT, "data", "deepforest_voc")


def parity_dir():
    """FCOS_PARITY_DIR, else ../shared/parity/r18_fpn64, else the copy vendored in tests/fixtures."""
    env = os.environ.get("FCOS_PARITY_DIR")
    if env:
        return env
    return SHARED_PARITY if os.path.isdir(SHARED_PARITY) else VENDORED_PARITY


@pytest.fixture(autouse=True)
def _reset_fcos_logger():
    """Entry points run in-process configure the 'fcos' logger (own handlers, no propagation);
    restore it after each test so later tests' caplog still sees its records."""
    import logging

    yield
    log = logging.getLogger("fcos")
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.propagate = True
    log.setLevel(logging.NOTSET)


@contextlib.contextmanager
def execution_mode(mode):
    """MindSpore's execution mode set to ``mode`` (ms.GRAPH_MODE / ms.PYNATIVE_MODE) for the block."""
    import mindspore as ms

    previous = ms.get_context("mode")
    ms.set_context(mode=mode)
    try:
        yield
    finally:
        ms.set_context(mode=previous)


@pytest.fixture(params=["graph", "pynative"])
def mode(request):
    """Run the test in GRAPH_MODE and in PYNATIVE_MODE (which must agree)."""
    import mindspore as ms

    with execution_mode(ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE):
        yield request.param


@pytest.fixture(scope="session")
def ops_library(tmp_path_factory):
    """Build the custom-op library into a fresh cache (a real g++ build, once per test session;
    tests/test_ops_cache.py builds into caches of its own) -> OneDNNConv2d; skips where it cannot
    be built."""
    from src.ops.build import OpsUnavailable, build

    previous = os.environ.get("FCOS_OPS_CACHE")
    # a test session's subprocesses (the ISA-lifted runs) reuse the session's build, and so do the
    # other pytest-xdist workers of the run (their base folders share a parent; the build is locked)
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ.setdefault("FCOS_TEST_OPS_CACHE", str(shared / "ops_cache"))
    os.environ["FCOS_OPS_CACHE"] = os.environ["FCOS_TEST_OPS_CACHE"]
    try:
        build()
        from src.ops.conv import OneDNNConv2d

        if os.environ.get("FCOS_TEST_LIFT_ISA") == "1":
            from src.ops.backend import LIFTED, lift_isa_cap

            assert lift_isa_cap() == LIFTED

        yield OneDNNConv2d
    except OpsUnavailable as err:
        pytest.skip(str(err))
    finally:
        if previous is None:
            os.environ.pop("FCOS_OPS_CACHE")
        else:
            os.environ["FCOS_OPS_CACHE"] = previous


def skip_without_runtime(runtime):
    """Skip, with the reason, a test of --runtime=onnxruntime where that optional package is missing."""
    if runtime == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed (optional: pip install onnxruntime)")


@pytest.fixture(scope="session")
def parity_path():
    return parity_dir()


@pytest.fixture(scope="session")
def deepforest_voc():
    return DEEPFOREST_VOC


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end checks (CI runs them too; their modules run first)")


def pytest_collection_modifyitems(session, config, items):
    """Modules with slow tests first, each module's tests kept together and in order: pytest-xdist
    (pytest.ini: -n 2 --dist loadscope) hands out whole modules in this order, so the long ones start
    early and the short ones fill the other worker, instead of one long module running alone last."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)  # stable: order kept within


def pycocotools_stats(ann_file, detections):
    """{AP, AP50, ...} of COCO ``detections`` scored by pycocotools itself over every image of
    ``ann_file``: an independent reference for what eval_result.json reports."""
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    if not detections:
        return dict.fromkeys(keys, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        evaluator = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(keys, (float(s) for s in evaluator.stats)))


def assert_same_detections(want, got, score_tol=2e-5, box_tol=0.02, what=""):
    """Two detection lists agree one to one, in any order of tied scores: ``want`` and ``got`` are
    (boxes (N, 4), scores (N,), labels (N,)); each wanted detection takes its own got detection of the
    same label with a score within score_tol, the nearest box among those, which must be within
    box_tol (the 5 and 2 decimals of the JSON files, plus float round-off)."""
    want_boxes, want_scores, want_labels = (np.asarray(a) for a in want)
    boxes, scores, labels = (np.asarray(a) for a in got)
    assert len(boxes) == len(want_boxes), what
    used = np.zeros(len(boxes), bool)
    for box, score, label in zip(want_boxes, want_scores, want_labels):
        close = ~used & (labels == label) & (np.abs(scores - score) <= score_tol)
        assert close.any(), f"{what}: no detection of label {label}, score {score:.5f}, box {box}"
        best = np.flatnonzero(close)[np.argmin(np.abs(boxes[close] - box).max(axis=1))]
        np.testing.assert_allclose(boxes[best], box, atol=box_tol, rtol=0, err_msg=what)
        used[best] = True
