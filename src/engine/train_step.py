"""The compiled training step: forward + loss, backward, gradient reduction, clipping, a guard
against non-finite values, and the optimiser update - one graph per input shape."""
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import ParameterTuple, nn, ops


def squared_global_norm(grads: Sequence[ms.Tensor]) -> ms.Tensor:
    """Sum of the squares of every gradient -> float32 scalar; not finite when any gradient holds
    a NaN or an infinity (or when the sum overflows float32).

    One dot product per gradient: it serves both the finiteness guard and clipping, and
    MindSpore's CPU reductions (ReduceSum, ReduceAll) are several times slower than its sgemm.
    """
    flat = [ops.cast(g, ms.float32).reshape(1, -1) for g in grads]
    return ops.addn([ops.matmul(g, g.reshape(-1, 1)).reshape(()) for g in flat])


def clip_by_global_norm(grads: Sequence[ms.Tensor], max_norm: float, squared_norm: ms.Tensor) -> Tuple[ms.Tensor, ...]:
    """Scale all gradients by min(1, max_norm / global L2 norm). Written out because
    ops.clip_by_global_norm returns shape (1,) for 0-d parameters (the head's scales)."""
    factor = ops.minimum(max_norm / (ops.sqrt(squared_norm) + 1e-6), 1.0)
    return tuple(g * factor.astype(g.dtype) for g in grads)


class FCOSWithLoss(nn.Cell):
    """Network + FCOSLoss: (images, gt_boxes, gt_labels, gt_mask) -> (total, cls, reg, ctr)."""

    def __init__(self, network: nn.Cell, loss_fn: nn.Cell) -> None:
        # No prefix, so parameter names in training checkpoints equal the bare network's.
        super().__init__(auto_prefix=False)
        self.network = network
        self.loss_fn = loss_fn

    def construct(self, images, gt_boxes, gt_labels, gt_mask):
        cls_logits, bbox_reg, centerness = self.network(images)
        return self.loss_fn(images, cls_logits, bbox_reg, centerness, gt_boxes, gt_labels, gt_mask)


class TrainStep(nn.Cell):
    """One optimiser step that skips the update when the loss or any gradient is not finite
    (or the gradients' squared norm overflows float32).

    construct(*inputs) -> (total, cls, reg, ctr, finite): the loss terms before the update and
    whether the update was applied. With a loss scaler (mixed precision) the loss is scaled
    for backward and the scale adapts to overflows. Gradients are averaged across devices
    before the finiteness check, so every rank takes the same decision. A skipped step also
    puts back the BatchNorm running statistics its forward pass moved, so that it changes
    nothing: a NaN batch would otherwise poison them for good. squared_norm: a cell computing
    squared_global_norm's value (src/ops/global_norm.py on CPU with the custom ops), else that
    function.
    """

    def __init__(self, net_with_loss: nn.Cell, optimizer: nn.Optimizer, grad_clip_norm: float = 0.0,
                 distributed: bool = False, loss_scaler: Optional[ms.amp.LossScaler] = None,
                 squared_norm: Optional[Callable[..., Any]] = None) -> None:
        super().__init__(auto_prefix=False)
        self.squared_norm = squared_norm if squared_norm is not None else squared_global_norm
        self.net_with_loss = net_with_loss
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad_clip_norm = float(grad_clip_norm)
        self.loss_scaler = loss_scaler
        self.grad_fn = ops.value_and_grad(self._scaled_forward, None, self.weights, has_aux=True)
        self.grad_reducer = nn.DistributedGradReducer(self.weights) if distributed else ops.identity
        self.running_stats = ParameterTuple(
            param for _, cell in net_with_loss.cells_and_names() if isinstance(cell, nn.BatchNorm2d)
            for param in (cell.moving_mean, cell.moving_variance))

    @property
    def network(self) -> nn.Cell:
        """The FCOS network being trained (what checkpoints of the model alone hold)."""
        return self.net_with_loss.network

    def _scaled_forward(self, images, gt_boxes, gt_labels, gt_mask):
        total, loss_cls, loss_reg, loss_ctr = self.net_with_loss(images, gt_boxes, gt_labels, gt_mask)
        if self.loss_scaler is not None:
            total = self.loss_scaler.scale(total)
        return total, loss_cls, loss_reg, loss_ctr

    def construct(self, images, gt_boxes, gt_labels, gt_mask):
        # "* 1.0": copies of the values, not references to the parameters BatchNorm updates in place
        stats_before = tuple(ops.stop_gradient(stat * 1.0) for stat in self.running_stats)
        (total, loss_cls, loss_reg, loss_ctr), grads = self.grad_fn(images, gt_boxes, gt_labels, gt_mask)
        grads = self.grad_reducer(grads)
        if self.loss_scaler is not None:
            total = self.loss_scaler.unscale(total)
            grads = self.loss_scaler.unscale(grads)
        squared_norm = self.squared_norm(grads)
        finite = ops.isfinite(squared_norm)
        if self.loss_scaler is not None:
            self.loss_scaler.adjust(finite)
        if self.grad_clip_norm > 0:
            grads = clip_by_global_norm(grads, self.grad_clip_norm, squared_norm)
        if finite:
            total = ops.depend(total, self.optimizer(grads))
        else:
            for stat, value in zip(self.running_stats, stats_before):
                total = ops.depend(total, ops.assign(stat, value))
        return total, loss_cls, loss_reg, loss_ctr, finite


def split_decay_params(params: Iterable[ms.Parameter],
                       decay_norm_bias: bool = False) -> Tuple[List[ms.Parameter], List[ms.Parameter]]:
    """Split trainable parameters into (with weight decay, without): biases, norm scales/shifts
    and the head's per-level scales get no decay unless decay_norm_bias."""
    decay, no_decay = [], []
    for param in params:
        if decay_norm_bias or param.ndim > 1:
            decay.append(param)
        else:
            no_decay.append(param)
    return decay, no_decay


def build_optimizer(params: Iterable[ms.Parameter], lr_schedule: np.ndarray, momentum: float, weight_decay: float,
                    decay_norm_bias: bool = False) -> nn.Momentum:
    """SGD with momentum; lr_schedule is a per-step float32 array indexed by the global step."""
    decay, no_decay = split_decay_params(params, decay_norm_bias)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return nn.Momentum(groups, learning_rate=ms.Tensor(lr_schedule), momentum=momentum)
