"""COCO box evaluation: pycocotools' official COCOeval against faster-coco-eval, side by side.

A synthetic COCO-sized set (default: 5,000 images, 80 categories, about 7 ground-truth boxes and
100 detections per image, i.e. 500,000 detections, as a COCO val2017 run of a detector keeping
100 per image) is evaluated by both, in this one process, on the same ``COCO`` objects: the
evaluator ``train_net.py`` uses when detectron2's compiled ops are absent (faster-coco-eval,
through ``FasterCOCOEvaluator``) and the pycocotools fallback it replaced. Prints each time
(evaluate + accumulate + summarize, medians), the speed-up, and the largest difference over the
12 summary numbers and over the precision array.

With ``--gt`` and ``--results`` it compares the two on a real run instead: a COCO ground-truth
JSON and the ``coco_instances_results.json`` that detectron2's COCOEvaluator saved.

Usage: python benchmarks/coco_eval.py [--images 5000] [--dets-per-image 100] [--classes 80]
       [--repeats 1]
       python benchmarks/coco_eval.py --gt datasets/deepforest/val.json \
           --results output/demo/inference/deepforest_tree_val/coco_instances_results.json
"""

import argparse
import contextlib
import io
import statistics
import time

import numpy as np
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def synthetic_set(num_images: int, dets_per_image: int, num_classes: int, seed: int = 0):
    """Ground truth with about 7 boxes per image (2% crowd) and, per image, ``dets_per_image``
    detections: jittered copies of 80% of the ground truth plus random boxes."""
    rng = np.random.default_rng(seed)
    cat_ids = np.arange(1, num_classes + 1)
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480})
        n_gt = int(rng.integers(0, 15))
        xy = rng.uniform(0, [560, 400], size=(n_gt, 2))
        wh = rng.uniform(4, 200, size=(n_gt, 2))
        cats = rng.choice(cat_ids, n_gt)
        crowd = rng.random(n_gt) < 0.02
        for i in range(n_gt):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(cats[i]),
                "bbox": [*xy[i], *wh[i]], "area": float(wh[i, 0] * wh[i, 1]),
                "iscrowd": int(crowd[i]),
            })  # fmt: skip
        hit = rng.random(n_gt) < 0.8
        n_hit = min(int(hit.sum()), dets_per_image)
        boxes = np.concatenate([xy[hit], wh[hit]], 1)[:n_hit]
        boxes = boxes + rng.normal(0, 0.1, boxes.shape) * np.tile(wh[hit][:n_hit], 2)
        n_rand = dets_per_image - n_hit
        rand = np.concatenate(
            [rng.uniform(0, [560, 400], (n_rand, 2)), rng.uniform(4, 200, (n_rand, 2))], 1
        )
        all_boxes = np.concatenate([boxes, rand])
        all_cats = np.concatenate([cats[hit][:n_hit], rng.choice(cat_ids, n_rand)])
        scores = np.concatenate([rng.uniform(0.3, 1, n_hit), rng.uniform(0, 0.7, n_rand)])
        for b, c, s in zip(all_boxes.tolist(), all_cats.tolist(), scores.tolist()):
            detections.append({"image_id": image_id, "category_id": c, "bbox": b, "score": s})
    categories = [{"id": int(c), "name": f"class{c}"} for c in cat_ids]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def run(cls, gt: COCO, dt: COCO):
    evaluator = cls(gt, dt, "bbox")
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # both print their progress and table
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return time.perf_counter() - start, evaluator


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--gt", help="COCO ground-truth JSON (instead of the synthetic set)")
    parser.add_argument("--results", help="COCO results JSON for --gt")
    args = parser.parse_args()
    if (args.gt is None) != (args.results is None):
        parser.error("--gt and --results go together")

    with contextlib.redirect_stdout(io.StringIO()):
        if args.gt:
            gt = COCO(args.gt)
            dt = gt.loadRes(args.results)
        else:
            dataset, detections = synthetic_set(args.images, args.dets_per_image, args.classes)
            gt = COCO()
            gt.dataset = dataset
            gt.createIndex()
            dt = gt.loadRes(detections)
    print(f"{len(gt.imgs)} images, {len(gt.anns)} ground-truth boxes, {len(dt.anns)} detections, "
          f"{len(gt.cats)} categories")

    times = {"pycocotools": [], "faster-coco-eval": []}
    results = {}
    for _ in range(args.repeats):
        for name, cls in (("pycocotools", COCOeval), ("faster-coco-eval", COCOeval_faster)):
            seconds, results[name] = run(cls, gt, dt)
            times[name].append(seconds)
    official, fast = results["pycocotools"], results["faster-coco-eval"]
    stats_diff = np.abs(np.asarray(official.stats) - np.asarray(fast.stats)).max()
    prec_diff = np.abs(official.eval["precision"] - fast.eval["precision"]).max()
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"{name:>17}: {t:8.2f} s")
    print(f"speed-up: {med['pycocotools'] / med['faster-coco-eval']:.1f}x")
    for name, e in (("pycocotools", official), ("faster-coco-eval", fast)):
        print(f"{name:>17}: AP {100 * e.stats[0]:.4f} AP50 {100 * e.stats[1]:.4f} "
              f"AP75 {100 * e.stats[2]:.4f}")
    print(f"max |diff| over the 12 summary numbers {stats_diff:.2e}, over the precision array "
          f"{prec_diff:.2e}")


if __name__ == "__main__":
    main()
