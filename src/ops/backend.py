"""The CPU backend in one place: which portable cell of src/model each native op of src/ops
replaces (NATIVE_OPS, one row per op), the one function that puts them into a built FCOS
(accelerate), and the explicit switch that builds the library and lifts oneDNN's ISA cap
(enable_native_ops).

A row says how to recognise the portable cell it replaces, how to recognise its native cell and
how to make one from the other (same Parameter objects, so names and checkpoints do not change).
The channels-last check and the export guard read the same table; accelerate records what it did
as ``network.backend`` (a dict: kind, layout, library, isa), which the compile cache's digest and
the export guard read. Adding a native op: its kernel and cell, and one row here.

Channels-last storage. oneDNN's CPU convolutions run on channels-last (N, H, W, C) data directly,
while MindSpore's tensors are NCHW: with NCHW tensors every convolution reorders its input, its output and, in the
backward, the gradients, to and from oneDNN's layout (on the quick start's layer set at 320x320
those reorders were 11% of the convolutions' time; docs/performance.md). So where every layer
between two convolutions is a custom op or element-wise, the network keeps its activations in
channels-last storage: a tensor keeps its (N, C, H, W) shape in the graph but holds its values in
(N, H, W, C) order. Only two kinds of op may touch such a tensor: the custom ops, each built with
a channels_last flag (convolutions, trained BatchNorm, GroupNorm, the stem's max-pool, the FPN
merge), and element-wise ops (ReLU, the residual Add, their gradients, AddN), for which the order
of the values does not matter. The network's edges convert: its first convolution reads the NCHW
image and its output convolutions write NCHW (FCOS.layout_edges()).

check_channels_last (below) refuses a network that still holds a layer which would read the
storage as NCHW (a MindSpore convolution, norm, pool or upsample that no custom op replaced).

conv_impl (configuration key): "mindspore" keeps MindSpore's kernels; "onednn" (CPU, float32) puts
the native ops in; "auto" does where the library builds, with one log line saying why not.
Ascend and GPU always keep MindSpore's kernels, as do exports (a MindIR/ONNX file must not name a
library on this machine).
"""
import ctypes
import dataclasses
import logging
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from mindspore import nn

from src.model.backbone import StemMaxPool
from src.model.fpn import UpsampleAdd
from src.model.norm import FrozenBatchNorm2d, GroupNorm
from src.ops.batch_norm import NativeBatchNorm2d
from src.ops.build import OpsUnavailable, library, mindspore_libdnnl
from src.ops.conv import OneDNNConv2d
from src.ops.group_norm import NativeGroupNormFunction
from src.ops.pooling import NativeStemMaxPool
from src.ops.upsample import NativeUpsampleAdd

logger = logging.getLogger("fcos")

PORTABLE = {"kind": "portable"}  # the record of a network accelerate did not touch


@dataclasses.dataclass
class SwapPlan:
    """What the factories need to know of the network as a whole: the storage, the frozen norms
    each convolution folds in, the ReLU each norm applies itself, and the convolutions at the
    network's edges (reading its NCHW input, writing its NCHW outputs)."""
    channels_last: bool = False
    fold: Dict[int, nn.Cell] = dataclasses.field(default_factory=dict)  # id(conv) -> FrozenBatchNorm2d
    relu_after: Dict[int, nn.Cell] = dataclasses.field(default_factory=dict)  # id(norm) -> its ReLU
    nchw_in: frozenset = frozenset()  # ids of convolutions reading NCHW
    nchw_out: frozenset = frozenset()  # ids of convolutions writing NCHW

    @classmethod
    def make(cls, channels_last: bool = False, fold: Iterable[Tuple[nn.Cell, nn.Cell]] = (),
             relu_pairs: Iterable[Tuple[nn.Cell, nn.Cell]] = (),
             edges: Tuple[Sequence[nn.Cell], Sequence[nn.Cell]] = ((), ())) -> "SwapPlan":
        return cls(channels_last, {id(conv): norm for conv, norm in fold},
                   {id(norm): relu for norm, relu in relu_pairs},
                   frozenset(id(c) for c in edges[0]), frozenset(id(c) for c in edges[1]))


def _conv(cell: nn.Conv2d, plan: SwapPlan) -> OneDNNConv2d:
    norm = plan.fold.get(id(cell))
    new = OneDNNConv2d(cell.in_channels, cell.out_channels, cell.kernel_size, stride=cell.stride,
                       pad_mode=cell.pad_mode, padding=cell.padding, dilation=cell.dilation, group=cell.group,
                       has_bias=cell.has_bias, folded_norm=norm, relu=norm is not None and id(norm) in plan.relu_after,
                       x_channels_last=plan.channels_last and id(cell) not in plan.nchw_in,
                       y_channels_last=plan.channels_last and id(cell) not in plan.nchw_out)
    new.weight = cell.weight
    if cell.has_bias:
        new.bias = cell.bias
    return new


def _batch_norm(cell: nn.BatchNorm2d, plan: SwapPlan) -> NativeBatchNorm2d:
    new = NativeBatchNorm2d(cell.num_features, eps=cell.eps, momentum=1.0 - cell.momentum,
                            relu=id(cell) in plan.relu_after, channels_last=plan.channels_last)
    new.gamma, new.beta = cell.gamma, cell.beta
    new.moving_mean, new.moving_variance = cell.moving_mean, cell.moving_variance
    return new


def _group_norm(cell: GroupNorm, plan: SwapPlan) -> GroupNorm:
    # the cell and its Parameters stay; the function computing it becomes the native one
    cell.function = NativeGroupNormFunction(cell.function.num_groups, cell.function.eps, plan.channels_last)
    return cell


@dataclasses.dataclass(frozen=True)
class NativeOp:
    """One native op: the portable cells it replaces, its native cells, and the factory."""
    name: str
    replaces: Callable[[nn.Cell], bool]
    is_native: Callable[[nn.Cell], bool]
    make: Callable[[nn.Cell, SwapPlan], nn.Cell]
    fuses_relu: bool = False  # the ReLU after the replaced cell (plan.relu_after) is applied by the op


NATIVE_OPS: Tuple[NativeOp, ...] = (
    NativeOp("convolution", lambda c: type(c) is nn.Conv2d, lambda c: isinstance(c, OneDNNConv2d), _conv),
    NativeOp("batch_norm", lambda c: type(c) is nn.BatchNorm2d, lambda c: isinstance(c, NativeBatchNorm2d),
             _batch_norm, fuses_relu=True),
    NativeOp("group_norm", lambda c: isinstance(c, GroupNorm) and not isinstance(c.function, NativeGroupNormFunction),
             lambda c: isinstance(c, GroupNorm) and isinstance(c.function, NativeGroupNormFunction), _group_norm),
    NativeOp("stem_pool", lambda c: isinstance(c, StemMaxPool), lambda c: isinstance(c, NativeStemMaxPool),
             lambda c, plan: NativeStemMaxPool(plan.channels_last)),
    NativeOp("fpn_merge", lambda c: isinstance(c, UpsampleAdd), lambda c: isinstance(c, NativeUpsampleAdd),
             lambda c, plan: NativeUpsampleAdd(plan.channels_last)),
)
# Portable cells that compute on NCHW and no row replaces: refused in channels-last storage.
NCHW_ONLY = (nn.MaxPool2d, nn.AvgPool2d, nn.GroupNorm)


def _replace(network: nn.Cell, wanted: Callable[[nn.Cell], bool], make: Callable[[nn.Cell], nn.Cell]) -> int:
    """Replace, in place, every child cell of network for which wanted(cell) holds by make(cell)
    -> the number replaced."""
    replaced = 0
    for _, parent in list(network.cells_and_names()):
        for name, child in list(parent.name_cells().items()):
            if not wanted(child):
                continue
            new = make(child)
            if new is not child:
                if isinstance(parent, (nn.SequentialCell, nn.CellList)):
                    # by index: SequentialCell runs a list of its cells that insert_child_to_cell leaves as it was
                    parent[int(name)] = new
                else:
                    parent.insert_child_to_cell(name, new)
            replaced += 1
    return replaced


def fold_frozen_norms(pairs: Iterable[Tuple[nn.Cell, FrozenBatchNorm2d]]) -> int:
    """Mark each (conv, FrozenBatchNorm2d) pair's norm as folded: the convolution's native op applies
    it (OneDNNConv2d folded_norm) and the norm passes its input through -> how many."""
    count = 0
    for _, norm in pairs:
        norm.folded = True
        count += 1
    return count


def replace_portable(network: nn.Cell, plan: Optional[SwapPlan] = None,
                     only: Optional[Sequence[str]] = None) -> Dict[str, int]:
    """Put the native op of every row (or of the rows named in only) in place of the portable cells
    it replaces, in place -> {row name: cells replaced}. ReLUs a native op applies become identities.
    Frozen norms named in plan.fold must be folded (fold_frozen_norms) by the caller."""
    plan = plan or SwapPlan()
    counts = {}
    fused = []
    for op in NATIVE_OPS:
        if only is not None and op.name not in only:
            continue
        if op.fuses_relu:
            fused += [plan.relu_after[id(c)] for _, c in network.cells_and_names()
                      if op.replaces(c) and id(c) in plan.relu_after]
        counts[op.name] = _replace(network, op.replaces, lambda cell, op=op: op.make(cell, plan))
    if only is None or "convolution" in only:  # the ReLUs the folded convolutions apply
        fused += [plan.relu_after[id(norm)] for norm in plan.fold.values() if id(norm) in plan.relu_after]
    ids = {id(relu) for relu in fused}
    _replace(network, lambda cell: id(cell) in ids, lambda _: nn.Identity())
    return counts


def reads_nchw(cell: nn.Cell) -> bool:
    """Whether cell would compute on its input as NCHW: a portable cell some row replaces, left in
    place; a frozen norm not folded; a cell of NCHW_ONLY."""
    if isinstance(cell, FrozenBatchNorm2d):
        return not cell.folded
    return any(op.replaces(cell) for op in NATIVE_OPS) or isinstance(cell, NCHW_ONLY)


def check_channels_last(network: nn.Cell) -> None:
    """ValueError naming the layers of network that would read channels-last storage as NCHW."""
    wrong = [name for name, cell in network.cells_and_names() if reads_nchw(cell)]
    if wrong:
        raise ValueError(f"channels-last storage needs every layer on the custom ops; these are not: {wrong[:5]}")


def native_cells(network: nn.Cell) -> List[str]:
    """Names of network's cells that are native ops (the export guard: such a file would name a
    library of this machine)."""
    return [name for name, cell in network.cells_and_names() if any(op.is_native(cell) for op in NATIVE_OPS)]


def accelerate(network: nn.Cell, channels_last: bool = True) -> nn.Cell:
    """Run an FCOS on the native ops, in place -> network, with network.backend recorded.

    The head's stacked convolutions (which call ops.Conv2D themselves) are unstacked, each frozen
    BatchNorm is folded into the convolution before it, every row of NATIVE_OPS is applied, and with
    channels_last the activations between the ops travel in channels-last storage (src/ops/backend.py)
    from the backbone's first convolution to the head's outputs, which check_channels_last proves.
    Call enable_native_ops first."""
    network.head.set_stacking(False)
    fold = network.backbone.frozen_norm_pairs()
    plan = SwapPlan.make(channels_last, fold, network.backbone.norm_relu_pairs(), network.layout_edges())
    fold_frozen_norms(fold)
    replace_portable(network, plan)
    if channels_last:
        check_channels_last(network)
    network.backend = {"kind": "native", "layout": "channels_last" if channels_last else "nchw",
                       "library": library(), "isa": isa_cap()}
    return network


def backend_of(cell: nn.Cell) -> dict:
    """The backend record of the first cell under cell that has one (accelerate's), else PORTABLE."""
    for _, sub in cell.cells_and_names():
        record = getattr(sub, "backend", None)
        if isinstance(record, dict):
            return record
    return PORTABLE


# ---------------------------------------------------------------- enabling the library

_said = set()  # log lines already written in this process (models are built more than once)
LIFTED = "oneDNN ISA cap lifted"
_isa_state: List[str] = []  # what lift_isa_cap found, once per process: oneDNN takes one setting only


def _say_once(level: int, message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.log(level, message)


def enable_native_ops(requested: str, device_target: str, amp_level: str = "O0") -> bool:
    """Decide conv_impl for this run and, when it is the native ops, build (or load) their library
    and lift oneDNN's ISA cap -> whether the native ops are on.

    OpsUnavailable when "onednn" was asked for and cannot be had here; "auto" falls back to
    MindSpore's kernels with one log line. Lifting the cap is process-wide and MindSpore's own
    Conv2D is ~100x slower without it: a process runs one or the other.
    """
    if requested == "mindspore" or device_target != "CPU":
        return False
    if amp_level != "O0":
        # the custom ops compute in float32; mixed precision would hand them float16 tensors
        if requested == "onednn":
            raise OpsUnavailable(f"the oneDNN convolutions are float32 only (amp_level={amp_level})")
        _say_once(logging.INFO, f"CPU convolutions: MindSpore's Conv2D (amp_level={amp_level}; the oneDNN ones "
                                "are float32)")
        return False
    try:
        library()
    except OpsUnavailable as err:
        if requested == "onednn":
            raise
        _say_once(logging.WARNING, f"CPU convolutions: MindSpore's Conv2D, slower in training ({err})")
        return False
    _say_once(logging.INFO, f"CPU convolutions: oneDNN custom ops (src/ops), {lift_isa_cap()}")
    return True


def lift_isa_cap() -> str:
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


def isa_cap() -> str:
    """The oneDNN ISA cap in force in this process: "none" once lifted, else ONEDNN_MAX_CPU_ISA."""
    return "none" if _isa_state == [LIFTED] else os.environ.get("ONEDNN_MAX_CPU_ISA", "")
