"""Draw detections (boxes, class names, scores) on an image with OpenCV.

    from src.utils.visualize import draw_detections, save_image
    save_image("out.png", draw_detections(image_rgb, boxes, scores, labels, class_names))
"""
import colorsys
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

from src.utils.io import atomic_path

_GOLDEN_RATIO = 0.618033988749895


def label_colour(label: int) -> Tuple[int, ...]:
    """A distinct, saturated RGB colour per label (hues spread by the golden ratio)."""
    hue = (int(label) * _GOLDEN_RATIO) % 1.0
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.95))


def caption(label: int, score: float, class_names: Optional[Sequence[str]] = None) -> str:
    """'<name> 0.87'; the name is the label index when no (or too short a) class list is given."""
    name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
    return f"{name} {score:.2f}"


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    class_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """Copy of ``image`` with every detection drawn, the lowest score first so the best are on top.

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) x1, y1, x2, y2 in image pixels; scores: (N,); labels: (N,) 0-based.
        class_names: optional list of names indexed by label.
    Returns:
        (H, W, 3) uint8 RGB.
    """
    canvas = np.ascontiguousarray(image).copy()
    height, width = canvas.shape[:2]
    # Line and text sizes follow the image, so drawings read the same on small and large images.
    thickness = max(1, round(min(height, width) / 300))
    font_scale = max(0.35, min(height, width) / 900)
    for i in np.argsort(np.asarray(scores), kind="stable"):
        colour = label_colour(labels[i])
        x1, y1, x2, y2 = (int(round(float(v))) for v in boxes[i])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        text = caption(int(labels[i]), float(scores[i]), class_names)
        (text_w, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        # The caption sits above the box, or inside its top when the box touches the image top.
        top = y1 - text_h - baseline if y1 - text_h - baseline >= 0 else y1
        left = min(max(x1, 0), max(width - text_w, 0))
        cv2.rectangle(canvas, (left, top), (left + text_w, top + text_h + baseline), colour, cv2.FILLED)
        cv2.putText(canvas, text, (left, top + text_h), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def save_image(path: str, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image (format from the extension) via a temporary file."""
    with atomic_path(path) as tmp:
        if not cv2.imwrite(tmp, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write image {path}")
