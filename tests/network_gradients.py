"""Gradients of a whole network for the tests that compare a network on custom ops with the
portable one (tests/test_onednn_conv.py, tests/test_native_batch_norm.py, tests/test_channels_last.py)."""
import mindspore as ms
import numpy as np
from mindspore import Tensor, nn


class NetworkObjective(nn.Cell):
    """sum over the network's outputs of output * weight: gradients of every trainable parameter."""

    def __init__(self, network, weights):
        super().__init__()
        self.network = network
        self.weights = weights

    def construct(self, x):
        total = 0.0
        for out, weight in zip(self.network(x), self.weights):
            total = total + (out * weight).sum()
        return total


def network_gradients(network, x, weights):
    """x (NumPy), weights (one Tensor per output) -> (objective value, {parameter name: gradient})."""
    params = network.trainable_params()
    grad = ms.value_and_grad(NetworkObjective(network, weights), grad_position=None, weights=params)
    value, grads = grad(Tensor(x))
    return float(value.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads)}


def copy_parameters(target, source):
    """Give target's Parameters source's values (the same names, in the same order)."""
    for mine, theirs in zip(target.get_parameters(), source.get_parameters()):
        assert mine.name == theirs.name
        mine.set_data(Tensor(theirs.asnumpy()))


def training_step_results(network, x):
    """network in training mode on x (NumPy) -> (its outputs as NumPy arrays, objective value,
    {parameter name: gradient}, {running statistic's name: value after the two forwards}), with
    one fixed random weight per output."""
    network.set_train(True)
    outputs = network(Tensor(x))
    weights = [Tensor(np.random.default_rng(i).standard_normal(out.shape).astype(np.float32))
               for i, out in enumerate(outputs)]
    value, grads = network_gradients(network, x, weights)
    stats = {p.name: p.asnumpy() for p in network.get_parameters() if "moving_" in p.name}
    return [out.asnumpy() for out in outputs], value, grads, stats
