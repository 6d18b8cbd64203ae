"""analyze_anchors' windowed search against the whole anchor grid, side by side.

COCO-like shape: 640x480 images with 7 boxes each (COCO's mean), sides from 4 px to the image,
aspect 1/4 to 4, the paper's anchors (P3-P7, 9 per location) and training sizes 640-800 (max
1333). The reference is what a direct implementation does: per image, detectron2's anchors on the
whole grid (about 150k at 800x1067) and ``pairwise_iou`` against the image's boxes. Both give the
same best IoU and foreground count per box (checked here, and in tests/test_analyze_anchors.py).

Usage: python benchmarks/analyze_anchors.py [--images 50]
"""

import argparse
import time

import numpy as np
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_anchor_generator
from detectron2.structures import Boxes, pairwise_iou

from retinanet_plugin import anchors as aa
from retinanet_plugin.config import load_config

STRIDES = (8, 16, 32, 64, 128)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=50)
    args = parser.parse_args()
    cfg = load_config("configs/Base-FocalRetinaNet.yaml")
    shapes = {f"p{i + 3}": ShapeSpec(channels=1, stride=s) for i, s in enumerate(STRIDES)}
    layout = aa.anchor_layout(cfg, shapes, 128)
    generator = build_anchor_generator(cfg, list(shapes.values()))

    rng = np.random.default_rng(0)
    n = 7 * args.images
    side = np.exp(rng.uniform(np.log(4), np.log(480), n))
    aspect = np.exp(rng.uniform(np.log(1 / 4), np.log(4), n))
    w, h = np.minimum(side / np.sqrt(aspect), 639), np.minimum(side * np.sqrt(aspect), 479)
    x0, y0 = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
    box_set = aa.BoxSet(np.stack([x0, y0, x0 + w, y0 + h], 1), np.tile([480, 640], (n, 1)),
                        args.images)
    sizes = aa.training_short_edges(cfg)

    start = time.perf_counter()
    ours = aa.measure_coverage(box_set, cfg, layout, sizes)
    t_ours = time.perf_counter() - start

    start = time.perf_counter()
    best, num_fg = [], []
    for short in sizes:
        boxes, hw = aa.resize_boxes(box_set, short, cfg.INPUT.MAX_SIZE_TRAIN)
        grid = layout.grid_sizes(*hw[0].tolist())
        anchors = Boxes.cat(generator([torch.zeros(1, 1, gh, gw) for gh, gw in grid]))
        for i in range(args.images):
            iou = pairwise_iou(Boxes(torch.as_tensor(boxes[7 * i: 7 * i + 7]).float()), anchors)
            best.append(iou.max(dim=1).values)
            num_fg.append((iou >= 0.5).sum(dim=1))
    t_full = time.perf_counter() - start

    same = torch.equal(torch.cat(num_fg), torch.from_numpy(ours.num_fg)) and torch.allclose(
        torch.cat(best), torch.from_numpy(ours.best_iou), atol=1e-6
    )
    pairs = len(ours.best_iou)
    print(f"{n} boxes x {len(sizes)} training sizes = {pairs} box-size pairs, {args.images} images")
    print(f"whole grid + pairwise_iou: {t_full:.2f} s ({1e6 * t_full / pairs:.0f} us per pair)")
    print(f"analyze_anchors windows:   {t_ours:.2f} s ({1e6 * t_ours / pairs:.0f} us per pair)")
    print(f"speed-up {t_full / t_ours:.1f}x; identical best IoU and foreground counts: {same}")


if __name__ == "__main__":
    main()
