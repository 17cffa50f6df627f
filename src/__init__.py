"""FCOS for MindSpore.

Importing this package before mindspore sets two environment defaults (a user's own values win;
Ascend and GPU ignore the first):
- oneDNN is capped at AVX2 on CPU: with AVX-512 allowed, oneDNN picks a reference convolution
  for MindSpore's NCHW Conv2D that runs ~100x slower. FCOS_ISA_CAP_DEFAULT=1 records that the
  cap is this default, not the user's choice (child processes inherit both): a run whose
  convolutions all go through src/ops lifts it (src/ops/backend.py).
- MindSpore's graph pipeline (C++ module PIPELINE) logs errors only. At its default level every
  run that compiles a new graph into the compile cache prints two warnings ("Open the hash file
  ... failed", "Check the consistency of dependency files hash failed") that only say the cache
  is empty; whether graphs were loaded or compiled is logged by src/engine/compile_cache.py.
  GLOG_v / MS_SUBMODULE_LOG_v set by the user show them again.
"""
import os

if "ONEDNN_MAX_CPU_ISA" not in os.environ:
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    os.environ["FCOS_ISA_CAP_DEFAULT"] = "1"
if "GLOG_v" not in os.environ:
    os.environ.setdefault("MS_SUBMODULE_LOG_v", "{PIPELINE:3}")
