"""Gradients of a whole network for the tests that compare a network on custom ops with the
portable one (tests/test_onednn_conv.py, tests/test_native_batch_norm.py)."""
import mindspore as ms
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
