"""Putting the custom-op cells of src/ops into a built network, in place of portable cells."""
from mindspore import nn


def replace_cells(network, wanted, make):
    """Replace, in place, every child cell of network for which wanted(cell) holds by make(cell)
    -> the number replaced. make keeps whatever Parameters the old cell had (names, objects)."""
    replaced = 0
    for _, parent in list(network.cells_and_names()):
        for name, child in list(parent.name_cells().items()):
            if not wanted(child):
                continue
            new = make(child)
            if isinstance(parent, (nn.SequentialCell, nn.CellList)):
                # by index: SequentialCell runs a list of its cells that insert_child_to_cell
                # leaves as it was (the old cell kept running)
                parent[int(name)] = new
            else:
                parent.insert_child_to_cell(name, new)
            replaced += 1
    return replaced


def drop_cells(network, cells):
    """Replace, in place, each of cells (parameter-free cells of network whose work another cell
    took over, e.g. a ReLU fused into the op before it) by an identity -> the number replaced."""
    ids = {id(cell) for cell in cells}
    return replace_cells(network, lambda cell: id(cell) in ids, lambda _: nn.Identity())
