"""FCOS for MindSpore.

Importing this package before mindspore caps oneDNN at AVX2 on CPU: with AVX-512 allowed,
oneDNN picks a reference convolution on NCHW tensors that runs ~100x slower. setdefault, so a
user can still override it; Ascend and GPU ignore the variable.
"""
import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
