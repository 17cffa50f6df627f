"""Preview the procedural tree-crown stands that ``--synthetic_crowns`` mixes into training: a grid
of stands with their crown boxes drawn, as the pipeline draws them before augmentation.

    python -m tools.synthetic_crowns --out stands.png [--rows 2 --cols 3 --size 400 --seed 0]
"""
import argparse

import cv2
import numpy as np

from src.data.synthetic_crowns import make_stand
from src.utils.visualize import save_image


def preview(rows, cols, size, seed):
    """-> (rows*size, cols*size, 3) uint8 RGB grid of stands with their boxes in red; stand i is
    the one of random stream (seed, i)."""
    tiles = []
    for index in range(rows * cols):
        image, boxes = make_stand(np.random.default_rng([seed, index]), size)
        for x1, y1, x2, y2 in boxes.astype(int):
            cv2.rectangle(image, (x1, y1), (x2 - 1, y2 - 1), (255, 0, 0), 1)
        tiles.append(image)
    return np.concatenate([np.concatenate(tiles[r * cols:(r + 1) * cols], 1) for r in range(rows)], 0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="image file to write (.png, .jpg)")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--cols", type=int, default=3)
    parser.add_argument("--size", type=int, default=400, help="stand side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    save_image(args.out, preview(args.rows, args.cols, args.size, args.seed))
    print(f"wrote {args.rows * args.cols} stands to {args.out}")


if __name__ == "__main__":
    main()
