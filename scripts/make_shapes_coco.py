#!/usr/bin/env python
"""Writes a small synthetic COCO detection dataset: rectangles, ellipses and triangles.

For trying "Train on your own data" (README) on data that no test uses. Boxes are integers, as
in most hand-made COCO files; a few images are grayscale or JPEG.

    python scripts/make_shapes_coco.py --out datasets/my_coco --train 120 --val 30
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ("rectangle", "ellipse", "triangle")


def _image(rng: np.random.Generator, width: int, height: int):
    background = tuple(int(v) for v in rng.integers(0, 90, 3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(int(rng.integers(1, 6))):
        w, h = (int(v) for v in rng.integers(24, min(width, height) // 2, 2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        colour = tuple(int(v) for v in rng.integers(120, 256, 3))
        category = int(rng.integers(0, len(CATEGORIES)))
        if category == 0:
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour)
        elif category == 1:
            draw.ellipse([x, y, x + w - 1, y + h - 1], fill=colour)
        else:
            draw.polygon([(x, y + h - 1), (x + w - 1, y + h - 1), (x + w // 2, y)], fill=colour)
        objects.append((category + 1, [x, y, w, h]))
    return image, objects


def write_split(out: Path, split: str, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        width, height = int(rng.integers(320, 481)), int(rng.integers(240, 361))
        image, objects = _image(rng, width, height)
        kind = i % 10
        if kind == 7:
            image = image.convert("L")  # grayscale
        name = f"{split}_{i:04d}.{'jpg' if kind == 3 else 'png'}"
        image.save(image_dir / name, **({"quality": 95} if kind == 3 else {}))
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for category_id, bbox in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(CATEGORIES)]
    path = out / f"{split}.json"
    coco = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(coco))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="datasets/my_coco")
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--val", type=int, default=30)
    args = parser.parse_args()
    out = Path(args.out)
    for split, count, seed in (("train", args.train, 0), ("val", args.val, 1)):
        print(write_split(out, split, count, seed))


if __name__ == "__main__":
    main()
