"""Which convolution a run uses (configuration key conv_impl), and the oneDNN ISA cap that goes with it.

- mindspore: MindSpore's Conv2D; on CPU oneDNN stays capped at AVX2 (src/__init__.py), which
  MindSpore's NCHW convolutions need.
- onednn (CPU): every nn.Conv2d runs as oneDNN custom ops (src/ops/conv.py) and the cap is
  lifted, so that oneDNN picks blocked layouts and AVX-512 kernels for them. The cap is
  process-wide and MindSpore's own Conv2D is ~100x slower without it, so this is all or nothing.
- auto (default): onednn on CPU in float32 runs where the ops build, mindspore otherwise, with one
  log line saying why.

Ascend and GPU always use MindSpore's Conv2D, as do exported models (MindIR/ONNX must not name a
library on this machine), so checkpoints and exports are the same either way.
"""
import ctypes
import logging
import os

from src.ops.build import OpsUnavailable, library, mindspore_libdnnl

logger = logging.getLogger("fcos")
_said = set()  # log lines already written in this process (models are built more than once)
LIFTED = "oneDNN ISA cap lifted"
_isa_state = []  # what lift_isa_cap found, once per process: oneDNN takes one setting only


def _say_once(level, message):
    if message not in _said:
        _said.add(message)
        logger.log(level, message)


def select_conv_impl(requested, device_target, amp_level="O0"):
    """conv_impl, device and mixed-precision level -> "onednn" or "mindspore".

    Builds the custom ops on first use (cached on disk). OpsUnavailable when "onednn" was asked for
    and cannot be had here; "auto" falls back to MindSpore's convolution with one log line.
    """
    if requested == "mindspore" or device_target != "CPU":
        return "mindspore"
    if amp_level != "O0":
        # the custom ops compute in float32; mixed precision would hand them float16 tensors
        if requested == "onednn":
            raise OpsUnavailable(f"the oneDNN convolutions are float32 only (amp_level={amp_level})")
        _say_once(logging.INFO, f"CPU convolutions: MindSpore's Conv2D (amp_level={amp_level}; the oneDNN ones are float32)")
        return "mindspore"
    try:
        library()
    except OpsUnavailable as err:
        if requested == "onednn":
            raise
        _say_once(logging.WARNING, f"CPU convolutions: MindSpore's Conv2D, slower in training ({err})")
        return "mindspore"
    _say_once(logging.INFO, f"CPU convolutions: oneDNN custom ops (src/ops), {lift_isa_cap()}")
    return "onednn"


def lift_isa_cap():
    """Let oneDNN use every instruction set of this CPU, unless the user chose a cap -> what holds now.

    dnnl_set_max_cpu_isa works only before oneDNN first dispatches a kernel in this process; after
    that (another network ran first, as in a test session) the cap stays and the custom ops run
    AVX2 kernels: same results, slower.
    """
    if not _isa_state:
        if os.environ.get("FCOS_ISA_CAP_DEFAULT") != "1":
            state = f"oneDNN ISA as you set it (ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')})"
        elif ctypes.CDLL(mindspore_libdnnl()).dnnl_set_max_cpu_isa(0) != 0:  # 0: dnnl_cpu_isa_default, no cap
            state = "oneDNN ISA left capped at AVX2 (oneDNN had already run a kernel in this process)"
        else:
            state = LIFTED
        _isa_state.append(state)
    return _isa_state[0]


def isa_cap():
    """The oneDNN ISA cap in force in this process: "none" once lifted, else ONEDNN_MAX_CPU_ISA."""
    return "none" if _isa_state == [LIFTED] else os.environ.get("ONEDNN_MAX_CPU_ISA", "")
