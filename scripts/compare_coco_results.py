"""Compare predict's COCO results with COCOEvaluator's for the same images.

predict numbers images in input order (``images.json`` maps its ids to file names); a COCO
dataset has its own ids. This script pairs them by file name and reports, per image, whether the
two files hold the same number of detections, and the largest box and score differences
(detections sorted by score).

Example (after ``make demo``)::

    python scripts/compare_coco_results.py --dataset-json datasets/deepforest/val.json \\
        --evaluator output/demo/inference/deepforest_tree_val/coco_instances_results.json \\
        --predict output/predict
"""

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np


def _group(results, id_map):
    grouped = defaultdict(list)
    for r in results:
        if r["image_id"] in id_map:
            grouped[id_map[r["image_id"]]].append(r)
    return {k: sorted(v, key=lambda r: -r["score"]) for k, v in grouped.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-json", required=True, help="the COCO dataset file")
    parser.add_argument("--evaluator", required=True, help="COCOEvaluator's results file")
    parser.add_argument("--predict", required=True, help="predict's --output folder")
    args = parser.parse_args()
    with open(args.dataset_json) as f:
        dataset_ids = {im["file_name"]: im["id"] for im in json.load(f)["images"]}
    with open(os.path.join(args.predict, "images.json")) as f:
        ours = {
            im["id"]: dataset_ids[os.path.basename(im["file_name"])]
            for im in json.load(f)["images"]
            if "frame" not in im and os.path.basename(im["file_name"]) in dataset_ids
        }
    with open(args.evaluator) as f:
        expected = _group(json.load(f), {i: i for i in dataset_ids.values()})
    with open(os.path.join(args.predict, "coco_instances_results.json")) as f:
        got = _group(json.load(f), ours)
    images = sorted(set(ours.values()))
    box_diff = score_diff = 0.0
    mismatched = []
    for image_id in images:
        e, g = expected.get(image_id, []), got.get(image_id, [])
        if len(e) != len(g) or [r["category_id"] for r in e] != [r["category_id"] for r in g]:
            mismatched.append(image_id)
            continue
        if e:
            box_diff = max(box_diff, float(np.abs(
                np.array([r["bbox"] for r in e]) - np.array([r["bbox"] for r in g])).max()))
            score_diff = max(score_diff, float(np.abs(
                np.array([r["score"] for r in e]) - np.array([r["score"] for r in g])).max()))
    total = sum(len(expected.get(i, [])) for i in images)
    print(
        f"{len(images)} images, {total} detections in the evaluator's file; count or class "
        f"mismatch on {len(mismatched)} images {mismatched}; max box difference {box_diff:.3g} "
        f"px, max score difference {score_diff:.3g}"
    )
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
