#!/usr/bin/env python
"""Time of the COCO checker on a large dataset: header reads (default) against full decoding.

Builds a COCO JSON of ``--num-images`` images that are hard links to a few copies of one JPEG
(no disk space; ext4 allows 65,000 links per file), one box each, and times ``check_coco_json``
in "off" (JSON only), "header" and "decode" modes; "decode" runs on ``--decode-images`` of them
and is extrapolated. The file is in the page cache, so this measures the checker, not a cold
network file system (where header reads wait on latency, which the 8 threads overlap).

    .venv/bin/python benchmarks/coco_check.py --num-images 100000
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from retinanet_plugin.data.coco_check import check_coco_json

LINKS_PER_FILE = 50_000


def _dataset(root: Path, count: int, width: int, height: int) -> Path:
    images_dir = root / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
        root / "source.jpg"
    )
    images, annotations = [], []
    for i in range(count):
        name = f"{i:07d}.jpg"
        source = root / f"source_{i // LINKS_PER_FILE}.jpg"
        if not source.exists():
            shutil.copyfile(root / "source.jpg", source)
        os.link(source, images_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        annotations.append(
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 50, 40]}
        )
    path = root / f"ann_{count}.json"
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
    path.write_text(json.dumps(coco))
    return path


def _time(path: Path, image_root: Path, mode: str, threads: int) -> float:
    start = time.perf_counter()
    check_coco_json(path, image_root, mode=mode, num_threads=threads)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=100_000)
    parser.add_argument("--decode-images", type=int, default=2_000)
    parser.add_argument("--size", default="640x480", help="WxH of the image")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        full = _dataset(root, args.num_images, width, height)
        coco = json.loads(full.read_text())
        subset = root / "subset.json"
        n = min(args.decode_images, args.num_images)
        coco["images"], coco["annotations"] = coco["images"][:n], coco["annotations"][:n]
        subset.write_text(json.dumps(coco))
        images = root / "images"
        print(f"{args.num_images} images of {width}x{height} (JPEG), {args.threads} threads")
        t_off = _time(full, images, "off", args.threads)
        print(f"off (JSON only):  {t_off:8.2f} s")
        t_header = _time(full, images, "header", args.threads)
        per_image = 1e6 * t_header / args.num_images
        print(f"header (default): {t_header:8.2f} s  ({per_image:.0f} us/image)")
        t_decode = _time(subset, images, "decode", args.threads) * args.num_images / n
        print(f"decode:           {t_decode:8.2f} s  (extrapolated from {n} images)")
        print(f"decode / header:  {t_decode / t_header:8.1f}x")


if __name__ == "__main__":
    main()
