"""ascend310_infer/ (the C++ inference program), built with CMake once per test session and run.

- Around the model call everything runs for real: main_fake is the real program (pipeline.cc,
  utils.cc) linked with a test double (ascend310_infer/test/fake_model.cc) in place of MindSpore;
  its outputs are computed from its inputs, so order, batching and the zero-filled last batch show
  in the result bins, which are read back with the Python contract (src/deploy/contract.py).
- The real program is built against the C++ headers and CPU runtime library of the mindspore-lite
  2.0.0 wheel from PyPI (downloaded once into FCOS_MSLITE_CACHE, default
  ~/.cache/fcos-tests/mindspore-lite-2.0.0; the tests that need it skip only when the download
  fails) and run on a MindIR that export.py writes with MindSpore 2.10: Lite 2.0.0 reads MindIR
  version 1 only, so the run must reach the runtime and end with one line naming the mismatch.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from src.deploy.contract import INFO_FILE, TIME_FILE, read_result, result_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER_DIR = os.path.join(ROOT, "ascend310_infer")
RUN_INFER = os.path.join(ROOT, "scripts", "run_infer_310.sh")
CACHE = os.environ.get("FCOS_MSLITE_CACHE",
                       os.path.join(os.path.expanduser("~"), ".cache", "fcos-tests", "mindspore-lite-2.0.0"))
RUNTIME_ENV = ("MINDSPORE_PATH", "LITE_HOME", "MS_LITE_HOME")
# The small FCOS of tests/test_export.py, exported at 64x64, batch 2.
MODEL_ARGS = ["--config_path=configs/synthetic_cpu.yaml", "--fpn_out_channels=32", "--num_head_convs=1",
              "--min_size=[64]", "--max_size=64"]
EXPORT_SHAPE = (2, 3, 64, 64)
FAKE = {"batch": 2, "height": 8, "width": 8, "candidates": 4, "sleep_ms": 20}
IMAGE_VALUES = 3 * FAKE["height"] * FAKE["width"]


def run(args, env=None, timeout=300):
    """Run a command in the repository root -> CompletedProcess (text output captured)."""
    return subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def clean_env(**extra):
    """os.environ without a MindSpore runtime location, with this Python first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in RUNTIME_ENV}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    env.update({k: str(v) for k, v in extra.items()})
    return env


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="session")
def mslite():
    """The unpacked mindspore-lite 2.0.0 wheel (its mindspore_lite folder), or None with the reason."""
    result = run([sys.executable, os.path.join(INFER_DIR, "test", "mslite_wheel.py"), CACHE], timeout=900)
    if result.returncode == 3:
        return None, result.stderr.strip()
    assert result.returncode == 0, result.stderr
    return result.stdout.strip(), ""


@pytest.fixture(scope="session")
def programs(mslite, tmp_path_factory):
    """main_fake always; main (Lite path) when the wheel is there: one CMake build per session."""
    if shutil.which("cmake") is None or shutil.which("g++") is None:
        pytest.skip("cmake and g++ are needed to build ascend310_infer")
    build = tmp_path_factory.mktemp("ascend310_infer_build")
    runtime, reason = mslite
    if runtime:  # through build.sh, as run_infer_310.sh builds
        result = run(["bash", os.path.join(INFER_DIR, "build.sh"), "-DFCOS_INFER_TEST_DOUBLE=ON"],
                     env=clean_env(BUILD_DIR=build, MINDSPORE_PATH=runtime), timeout=900)
    else:
        result = run(["cmake", "-S", INFER_DIR, "-B", build, "-DFCOS_INFER_TEST_DOUBLE=ON"])
        if result.returncode == 0:
            result = run(["cmake", "--build", build, "-j", "2"], timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return {"build": build, "fake": build / "main_fake", "main": build / "main" if runtime else None,
            "runtime": runtime, "reason": reason, "log": result.stdout}


@pytest.fixture()
def fake_setup(tmp_path):
    """A fake model spec, and a folder of 5 input bins written out of name order plus files to ignore."""
    model = tmp_path / "model.txt"
    log = tmp_path / "calls.log"
    spec = " ".join(f"{k}={v}" for k, v in FAKE.items())
    model.write_text(f"fcos-fake-model {spec} log={log}\n")
    inputs = tmp_path / "images"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    images = {}
    for name in ["000003", "000000", "000004", "000001", "000002"]:
        images[name] = rng.standard_normal((3, FAKE["height"], FAKE["width"])).astype(np.float32) + 1.0
        images[name].tofile(inputs / f"{name}.bin")
    (inputs / "notes.txt").write_text("not an input")
    (inputs / "zzz.bin").mkdir()  # a folder, not an input file
    return {"model": model, "log": log, "inputs": inputs, "images": images, "results": tmp_path / "results"}


def run_fake(programs, setup, *extra, model=None):
    return run([programs["fake"], f"--mindir_path={model or setup['model']}", f"--input_path={setup['inputs']}",
                f"--result_path={setup['results']}", "--device_type=CPU", *extra])


def read_calls(log):
    """calls.log -> {(call, slot): nonzero values}."""
    calls = {}
    for line in log.read_text().splitlines():
        _, call, _, slot, _, nonzero = line.split()
        calls[(int(call), int(slot))] = int(nonzero)
    return calls


def test_fake_model_batches_in_name_order_and_writes_every_image(programs, fake_setup):
    start = time.perf_counter()
    result = run_fake(programs, fake_setup)
    wall_ms = 1e3 * (time.perf_counter() - start)
    assert result.returncode == 0, result.stderr
    batch, k = FAKE["batch"], FAKE["candidates"]
    names = sorted(fake_setup["images"])
    for i, name in enumerate(names):
        call, slot = 1 + i // batch, i % batch  # call 0 is the warm-up
        x = fake_setup["images"][name].ravel()
        boxes, scores, labels = read_result(fake_setup["results"], name, k)
        np.testing.assert_array_equal(boxes[:, 0], np.full(k, x[0]))
        np.testing.assert_array_equal(boxes[:, 1], np.full(k, x[-1]))
        np.testing.assert_array_equal(boxes[:, 2], x[np.arange(k) % x.size])
        np.testing.assert_array_equal(boxes[:, 3], np.full(k, call, np.float32))
        np.testing.assert_array_equal(scores, np.full(k, slot, np.float32))
        np.testing.assert_array_equal(labels, 1000 * call + 100 * slot + np.arange(k))
    expected_files = sorted([os.path.basename(result_path("", n, i)) for n in names for i in range(3)] + [TIME_FILE])
    assert sorted(os.listdir(fake_setup["results"])) == expected_files, "one file per output and image, no leftovers"
    # Warm-up on zeros; 5 images in batches of 2: the last batch's second slot is zeros, although the
    # batch before had an image there.
    calls = read_calls(fake_setup["log"])
    assert calls == {(0, 0): 0, (0, 1): 0, (1, 0): IMAGE_VALUES, (1, 1): IMAGE_VALUES, (2, 0): IMAGE_VALUES,
                     (2, 1): IMAGE_VALUES, (3, 0): IMAGE_VALUES, (3, 1): 0}
    timing = json.loads((fake_setup["results"] / TIME_FILE).read_text())
    assert sorted(timing) == ["batch_size", "images", "mean_ms_per_batch", "mean_ms_per_image"]
    assert timing["images"] == 5 and timing["batch_size"] == batch
    # each model call sleeps sleep_ms: the time of the 3 timed calls (milliseconds, the warm-up left out)
    assert FAKE["sleep_ms"] <= timing["mean_ms_per_batch"] and 4 * timing["mean_ms_per_batch"] <= wall_ms
    assert timing["mean_ms_per_batch"] == pytest.approx(timing["mean_ms_per_image"] * 5 / 3, rel=1e-3, abs=2e-6)
    assert result.stdout.splitlines()[0] == "runtime: fake model (test double), device CPU 0"
    assert result.stdout.splitlines()[-1] == (f"NN inference cost average time: {timing['mean_ms_per_image']:.3f} "
                                              "ms per image (5 images, batch 2)")
    assert result.stderr == ""


def test_fake_model_single_image_in_a_larger_batch(programs, fake_setup):
    for name in sorted(fake_setup["images"])[1:]:
        os.remove(fake_setup["inputs"] / f"{name}.bin")
    result = run_fake(programs, fake_setup)
    assert result.returncode == 0, result.stderr
    assert read_calls(fake_setup["log"]) == {(0, 0): 0, (0, 1): 0, (1, 0): IMAGE_VALUES, (1, 1): 0}
    assert json.loads((fake_setup["results"] / TIME_FILE).read_text())["images"] == 1


def _wrong_size(setup):
    (setup["inputs"] / "000002.bin").write_bytes(b"\0" * 100)


def _empty_inputs(setup):
    for path in setup["inputs"].glob("*.bin"):
        if path.is_file():
            path.unlink()


def _result_is_a_file(setup):
    setup["results"].write_text("a file")


@pytest.mark.parametrize("change, extra, message", [
    (_wrong_size, [], "000002.bin has 100 bytes, the model input needs 768 per image (preprocessed at another "
                      "export shape?)"),
    (_empty_inputs, [], "no .bin input files in "),
    (_result_is_a_file, [], "--result_path: cannot create the folder "),
    (None, ["--mindir_path=/nonexistent/model.mindir"], "--mindir_path: not a file: /nonexistent/model.mindir"),
    (None, ["--input_path=/nonexistent/images"], "--input_path: not a folder: /nonexistent/images"),
    (None, ["--device_type=NPU"], "--device_type must be Ascend, GPU or CPU, got 'NPU'"),
    (None, ["--device_id=first"], "--device_id must be a number, got 'first'"),
    (None, ["--batch=2"], "unknown flag --batch"),
    (None, ["positional"], "expected --name=value, got 'positional'"),
])
def test_bad_input_is_one_error_line_and_no_results(programs, fake_setup, change, extra, message):
    if change:
        change(fake_setup)
    result = run_fake(programs, fake_setup, *extra)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [result.stderr.splitlines()[-1]], result.stderr
    assert message in result.stderr.splitlines()[-1]
    results = fake_setup["results"]
    assert not results.is_dir() or os.listdir(results) == [], "nothing is written before the inputs are checked"


def test_required_flags(programs, tmp_path):
    result = run([programs["fake"], f"--input_path={tmp_path}"])
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "usage: main --mindir_path=FILE --input_path=DIR --result_path=DIR [--device_type=Ascend|GPU|CPU] "
        "[--device_id=0] [--precision_mode=MODE]",
        "error: --mindir_path, --input_path and --result_path are required"]


@pytest.mark.parametrize("spec, message", [
    ("fail_at_call=2", "the model failed on the batch of {inputs}/000002.bin: fake failure at call 2"),
    ("fail_at_call=0", "the model failed on a batch of zeros (warm-up): fake failure at call 0"),
    ("labels_dtype=float32", "expected outputs boxes float32 (B, K, 4), scores float32 (B, K), labels int32 (B, K) "
                             "with B=2, got [float32 (2, 4, 4), float32 (2, 4), float32 (2, 4)]"),
])
def test_model_failures_are_one_error_line_and_no_timing(programs, fake_setup, spec, message):
    model = fake_setup["model"]
    model.write_text(model.read_text().strip() + f" {spec}\n")
    result = run_fake(programs, fake_setup)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [f"error: {message.format(inputs=fake_setup['inputs'])}"]
    assert not (fake_setup["results"] / TIME_FILE).exists()
    if spec == "fail_at_call=2":  # the first batch was written, the failed one not
        assert os.path.isfile(result_path(fake_setup["results"], "000001", 2))
        assert not os.path.exists(result_path(fake_setup["results"], "000002", 0))


def test_a_file_that_is_not_a_model(programs, fake_setup):
    fake_setup["model"].write_text("something else\n")
    result = run_fake(programs, fake_setup)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [f"error: {fake_setup['model']} is not a fake model spec "
                                          "(expected 'fcos-fake-model key=value ...')"]


# ---- the real program on MindSpore Lite 2.0.0 (CPU) ----

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A randomly initialised small FCOS exported by export.py (MindSpore 2.10 MindIR) -> its paths."""
    import mindspore as ms

    from src.builder import build_model
    from src.config import load_config

    root = tmp_path_factory.mktemp("exported")
    ms.set_seed(0)
    ms.save_checkpoint(build_model(load_config(MODEL_ARGS)), str(root / "fcos.ckpt"))
    b, _, h, w = EXPORT_SHAPE
    result = run([sys.executable, "export.py", *MODEL_ARGS, f"--ckpt_file={root / 'fcos.ckpt'}",
                  f"--file_name={root / 'fcos'}", f"--export_height={h}", f"--export_width={w}",
                  f"--export_batch_size={b}"], env=clean_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from mindspore.train.mind_ir_pb2 import ModelProto

    proto = ModelProto()
    proto.ParseFromString((root / "fcos.mindir").read_bytes())
    return {"root": root, "mindir": root / "fcos.mindir", "mind_ir_version": proto.mind_ir_version,
            "producer": f"{proto.producer_name} {proto.model_version}", "ms_version": ms.__version__}


def need_main(programs):
    if programs["main"] is None:
        pytest.skip(f"mindspore-lite 2.0.0 wheel not available: {programs['reason']}")
    return programs["main"]


def test_build_says_what_it_found(programs):
    need_main(programs)
    assert f"ascend310_infer: MindSpore runtime from MINDSPORE_PATH: {programs['runtime']}" in programs["log"]
    assert (f"ascend310_infer: runtime library {programs['runtime']}/lib/libmindspore-extendrt_python.so "
            "(release '2.0.0'), loading with Model::Build(path, kMindIR, context) (ENABLE_LITE)") in programs["log"]


def test_lite_2_0_reaches_the_runtime_and_names_the_mindir_version_mismatch(programs, exported, tmp_path):
    main = need_main(programs)
    assert exported["producer"] == f"MindSpore {exported['ms_version']}" and exported["mind_ir_version"] == 3
    inputs = tmp_path / "images"
    inputs.mkdir()
    np.zeros(EXPORT_SHAPE[1:], np.float32).tofile(inputs / "000000.bin")
    result = run([main, f"--mindir_path={exported['mindir']}", f"--input_path={inputs}",
                  f"--result_path={tmp_path / 'results'}", "--device_type=CPU"])
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == "runtime: MindSpore Lite 2.0.0, Model::Build(path, kMindIR), device CPU 0"
    # The runtime itself was reached: its own log says which MindIR versions it reads.
    assert "This software can only support the maximum mind ir version: 1" in result.stderr
    assert error_lines(result.stderr) == [result.stderr.strip().splitlines()[-1]]
    assert error_lines(result.stderr)[0] == (
        f"error: MindIR/runtime version mismatch: {exported['mindir']} is MindIR version 3, exported by "
        f"MindSpore {exported['ms_version']}, newer than MindSpore Lite 2.0.0, which could not build it "
        f"(Common error code.); build ascend310_infer against the MindSpore Lite release of the exporting "
        f"MindSpore ({exported['ms_version']})")
    assert os.listdir(tmp_path / "results") == []


@pytest.mark.parametrize("content, message", [
    (b"", "{path} is empty"),
    (None, "{path} is not a MindIR file (field 7 runs past the end)"),  # the export cut short
    (b"\x0a\x03abc", "{path} is not a MindIR file (no producer name)"),
])
def test_real_program_rejects_a_broken_mindir_before_the_runtime(programs, exported, tmp_path, content, message):
    main = need_main(programs)
    path = tmp_path / "broken.mindir"
    path.write_bytes(exported["mindir"].read_bytes()[:2000] if content is None else content)
    result = run([main, f"--mindir_path={path}", f"--input_path={tmp_path}", f"--result_path={tmp_path / 'r'}",
                  "--device_type=CPU"])
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {message.format(path=path)}"], "the runtime logged nothing"


# ---- scripts/run_infer_310.sh: which runner it picks ----

def test_run_infer_310_uses_the_cpp_program_when_it_builds(programs, exported, tmp_path):
    """With a runtime that builds, the script runs the C++ program, and its failure is the script's."""
    need_main(programs)
    from tools.synthetic import make_synthetic_coco

    ann_file = make_synthetic_coco(str(tmp_path / "set"), 2, 64, 64, seed=1)
    env = clean_env(MINDSPORE_PATH=programs["runtime"], CPP_BUILD_DIR=programs["build"], OUTPUT_DIR=tmp_path / "out")
    result = run(["bash", RUN_INFER, exported["mindir"], tmp_path / "set" / "images", ann_file, "y", "CPU"], env=env)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "inference runs with: the C++ program" in result.stdout
    assert "Python MindIR runner" not in result.stdout
    assert "error: MindIR/runtime version mismatch:" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == (f"error: inference (C++, CPU 0) failed, see "
                                                      f"{tmp_path / 'out' / 'infer.log'}")
    assert json.loads((tmp_path / "out" / "preprocess_Result" / INFO_FILE).read_text())["num_images"] == 2


def test_run_infer_310_cpp_runner_required_but_no_runtime(exported, tmp_path):
    """INFER_RUNNER=cpp without a MindSpore C++ runtime: one error line, no Python fallback."""
    out = tmp_path / "out"
    (out / "preprocess_Result").mkdir(parents=True)
    (out / "preprocess_Result" / INFO_FILE).write_text("{}")
    env = clean_env(OUTPUT_DIR=out, INFER_RUNNER="cpp", CPP_BUILD_DIR=tmp_path / "build")
    result = run(["bash", RUN_INFER, exported["mindir"], tmp_path, exported["mindir"], "n", "CPU", "0"], env=env)
    assert result.returncode == 1
    assert "no MindSpore C++ inference runtime found" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == (f"error: ascend310_infer did not build (INFER_RUNNER=cpp), "
                                                      f"see {out / 'build.log'}")
    assert not (tmp_path / "build").exists()


@pytest.mark.slow
def test_check_ascend310_build_script(mslite):
    """scripts/check_ascend310_build.sh on the cached wheel: syntax of every source and both loading
    paths, and both builds linked against the wheel's library."""
    runtime, reason = mslite
    if runtime is None:
        pytest.skip(f"mindspore-lite 2.0.0 wheel not available: {reason}")
    result = run(["bash", os.path.join(ROOT, "scripts", "check_ascend310_build.sh"), runtime], env=clean_env(),
                 timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "syntax check passed" in result.stdout
    assert "loading with Model::Build(path, kMindIR, context) (ENABLE_LITE)" in result.stdout
    assert "loading with Serialization::Load + Model::Build(GraphCell, context)" in result.stdout
    assert "build and link check passed" in result.stdout


def test_mslite_wheel_never_deletes_a_folder_it_did_not_make(tmp_path):
    """FCOS_MSLITE_CACHE=~/.cache once meant rmtree of the user's cache; now a non-empty folder
    without the tool's marker is refused in one line and left as it was."""
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    result = subprocess.run([sys.executable, os.path.join(INFER_DIR, "test", "mslite_wheel.py"), str(folder),
                             str(tmp_path / "no.whl")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"error: {folder} exists and is not a runtime folder made by this tool")
    assert sorted(os.listdir(folder)) == ["precious.txt"]


def test_a_failed_result_write_exits_1_with_one_line_and_leaves_nothing(programs, fake_setup):
    """A file-size limit of 0 makes every write fail. Mutation caught: checking the stream before
    it was flushed (the empty temporary renamed into place, exit 0)."""
    command = " ".join([str(programs["fake"]), f"--mindir_path={fake_setup['model']}",
                        f"--input_path={fake_setup['inputs']}", f"--result_path={fake_setup['results']}",
                        "--device_type=CPU"])
    result = run(["bash", "-c", f"ulimit -f 0; exec {command}"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert error_lines(result.stderr) == [result.stderr.splitlines()[-1]]
    assert "cannot write " in result.stderr.splitlines()[-1]
    assert [name for name in os.listdir(fake_setup["results"]) if os.path.getsize(fake_setup["results"] / name)
            == 0 or name.endswith(".tmp")] == []


def test_a_link_loop_among_the_inputs_is_one_line(programs, fake_setup):
    """A symlink loop named like an input: once an uncaught filesystem_error (abort, rc 134)."""
    os.symlink("loop.bin", fake_setup["inputs"] / "loop.bin")
    result = run_fake(programs, fake_setup)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [result.stderr.splitlines()[-1]]
    assert "loop.bin" in result.stderr and "symbolic links" in result.stderr


def test_an_input_shape_whose_size_overflows_is_one_line(programs, fake_setup, tmp_path):
    model = tmp_path / "huge.txt"
    model.write_text(f"fcos-fake-model batch=2 height={2 ** 31} width={2 ** 31} candidates=4 log={tmp_path / 'l'}\n")
    result = run_fake(programs, fake_setup, model=model)
    assert result.returncode == 1
    assert "is larger than 68719476736 bytes a batch" in result.stderr.splitlines()[-1]
