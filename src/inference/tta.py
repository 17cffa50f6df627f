"""Test-time augmentation: run the network on flipped and turned copies of each image and map
their candidates back, for src.inference.select to fuse (select_detections with view ids).

A view is (k, hflip): the image is mirrored left-right when hflip, then turned k times by 90
degrees counter-clockwise (np.rot90). Each image's own region (its resized size, not the padding)
is transformed and placed at the top-left of the padded input, as preprocessing places an image, so
the network sees every view exactly as it would see such a photo.
"""
from typing import Callable, Iterable, List, Sequence, Tuple, Union

import numpy as np

from src.geometry import hflip_boxes, rot90_boxes


IDENTITY = ((0, False),)
VIEW_SETS = {
    "none": IDENTITY,
    # Left-right mirror: the one symmetry of ground-level photos (torchvision's and mmdetection's
    # usual flip test).
    "hflip": ((0, False), (0, True)),
    # All 8 symmetries of the square: valid where up has no meaning, as in nadir aerial imagery.
    "dihedral": tuple((k, flip) for flip in (False, True) for k in range(4)),
}


def transform_image(image: np.ndarray, view: Tuple[int, bool]) -> np.ndarray:
    """(C, h, w) -> the view of it: (C, h, w) for an even number of turns, else (C, w, h)."""
    turns, hflip = view
    if hflip:
        image = image[:, :, ::-1]
    return np.ascontiguousarray(np.rot90(image, turns, axes=(1, 2)))


def transform_boxes(boxes: np.ndarray, view: Tuple[int, bool], image_size: Sequence[int]) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 boxes of an image of size (h, w) -> where they lie in transform_image's
    view of it."""
    turns, hflip = view
    if hflip:
        boxes = hflip_boxes(boxes, image_size[1])
    return rot90_boxes(boxes, turns, image_size)


def invert_boxes(boxes: np.ndarray, view: Tuple[int, bool], image_size: Sequence[int]) -> np.ndarray:
    """(N, 4) boxes in the view of an image of size (h, w) -> the same boxes in the image (the
    inverse of transform_boxes)."""
    turns, hflip = view
    view_size = image_size if turns % 2 == 0 else image_size[::-1]
    boxes = rot90_boxes(boxes, 4 - turns % 4, view_size)
    return hflip_boxes(boxes, image_size[1]) if hflip else boxes


def view_batch(images: np.ndarray, image_sizes: Union[np.ndarray, Sequence[Sequence[int]]],
               view: Tuple[int, bool]) -> np.ndarray:
    """(B, C, H, W) padded batch -> the batch of every image's view, each at the top-left of a
    zero (B, C, H, W) input, or (B, C, W, H) for an odd number of turns."""
    batch, channels, height, width = images.shape
    shape = (batch, channels, height, width) if view[0] % 2 == 0 else (batch, channels, width, height)
    out = np.zeros(shape, images.dtype)
    for i, (h, w) in enumerate(image_sizes):
        view_image = transform_image(images[i, :, :h, :w], view)
        out[i, :, :view_image.shape[1], :view_image.shape[2]] = view_image
    return out


def view_candidates(runtime: Callable[[np.ndarray], Tuple[np.ndarray, ...]], images: np.ndarray,
                    image_sizes: Union[np.ndarray, Sequence[Sequence[int]]],
                    views: Sequence[Tuple[int, bool]] = IDENTITY) -> Tuple[np.ndarray, ...]:
    """Decoder candidates of every view of a batch, in each image's own frame.

    Args:
        runtime: images (B, 3, H, W) -> candidates (src.inference.runtime).
        images: (B, 3, H, W) float32 padded batch; image_sizes: (B, 2) (h, w) of each image in it.
        views: (k, hflip) pairs, e.g. VIEW_SETS["dihedral"].
    Returns:
        boxes (B, V*K, 4), scores (B, V*K), labels (B, V*K), view_ids (V*K,) int32: the V views'
        candidates one after the other, boxes mapped back onto the untransformed image (not clipped).
    """
    if tuple(views) == IDENTITY:
        boxes, scores, labels = runtime(images)
        return boxes, scores, labels, np.zeros(scores.shape[1], np.int32)
    all_boxes, all_scores, all_labels, view_ids = [], [], [], []
    for index, view in enumerate(views):
        boxes, scores, labels = runtime(view_batch(images, image_sizes, view))
        all_boxes.append(np.stack([invert_boxes(b, view, tuple(size)) for b, size in zip(boxes, image_sizes)]))
        all_scores.append(scores)
        all_labels.append(labels)
        view_ids.append(np.full(scores.shape[1], index, np.int32))
    return (np.concatenate(all_boxes, axis=1), np.concatenate(all_scores, axis=1),
            np.concatenate(all_labels, axis=1), np.concatenate(view_ids))


def view_pad_shapes(pad_shapes: Iterable[Sequence[int]], views: Iterable[Tuple[int, bool]]) -> List[Tuple[int, ...]]:
    """The (H, W) inputs that the views of batches padded to pad_shapes run at: every shape, and
    its transpose where a view turns the image by 90 degrees."""
    shapes = list(dict.fromkeys(tuple(shape) for shape in pad_shapes))
    if any(turns % 2 for turns, _ in views):
        shapes += [(w, h) for h, w in shapes if (w, h) not in shapes]
    return shapes
