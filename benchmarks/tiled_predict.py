"""AP of ``predict --tile`` on the demo's whole validation image, scored against that image's own
annotations, beside untiled predict and the 400 px validation tiles the demo evaluates.

The image is ``datasets/deepforest/raw/2019_YELL_2_541000_4977000_image_crop.png`` (1249 x 1035,
279 crowns). Its whole-image ground truth is made from the raw VOC file by the dataset's own
converter (``retinanet_plugin.data.tiling.convert_voc_to_coco`` with one window the size of the
image, so the boxes follow val.json's convention), written to a temporary folder. Every
prediction goes through :func:`retinanet_plugin.predict.predict`, the command line's library:

* ``untiled``: the whole image through the test resize (400 px max for the demo: 3.1x smaller);
* ``--tile T --tile-overlap F``: for each overlap given;
* ``val tiles``: the 16 tiles of ``val.json`` scored against ``val.json``, as ``COCOEvaluator``
  scores them (maxDets 100 per tile).

With ``--ablate``, the windows of the ``--ablate`` overlap (default 0.25) are merged again
without each rule of the merge (hand-over of cut boxes at several edge margins and cover
fractions, cross-window NMS, both), from the very detections predict merged, to show what each
rule is worth.

The whole image is scored by pycocotools' COCOeval with maxDets (1, 10, 10000), so that no
detection the model returns is cut by the scorer (a tile keeps up to TEST.DETECTIONS_PER_IMAGE,
the whole image up to that per tile's worth of area).

Usage (after ``make demo``, or with any checkpoint of the demo config)::

    .venv/bin/python benchmarks/tiled_predict.py --weights output/demo/model_final.pth \\
        [--config-file configs/demo_deepforest_mobilenet_v2_fpn_long.yaml] [--tile 400] \\
        [--overlaps 0.1 0.25 0.5] [--out output/tiled_predict] [--ablate 0.25]
"""

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import sys
import tempfile
import time

import cv2
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet_plugin.data.deepforest import CLASS_MAP, default_root
from retinanet_plugin.data.tiling import convert_voc_to_coco
from retinanet_plugin.evaluation.results import instances_to_coco_results
from retinanet_plugin.predict import TiledPredictor, predict
from retinanet_plugin.tools.model_setup import dataset_categories, load_cfg, load_model

STEM = "2019_YELL_2_541000_4977000_image_crop"


def whole_image_ground_truth(raw_dir: str, out_dir: str) -> str:
    """The whole validation image's annotations as a COCO file (one image, id 1)."""
    image_path = os.path.join(raw_dir, STEM + ".png")
    height, width = cv2.imread(image_path).shape[:2]
    convert_voc_to_coco(
        [(os.path.join(raw_dir, STEM + ".xml"), image_path)], out_dir, "whole",
        class_map=CLASS_MAP, tile_size=max(height, width), overlap=0, min_visibility=1.0,
    )
    return os.path.join(out_dir, "whole.json")


def score(gt_file: str, results, max_dets=(1, 10, 100)):
    """AP, AP50, AP75 (percent) of ``results`` against ``gt_file``."""
    gt = COCO(gt_file) if isinstance(gt_file, str) else gt_file
    if not results:
        return 0.0, 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluation.params.maxDets = list(max_dets)
        evaluation.evaluate()
        evaluation.accumulate()
    # summarize()'s AP line reads maxDets 100 whatever params.maxDets holds: read the precision
    # table (T IoUs, R recalls, K classes, A areas, M maxDets) at area "all" and the last maxDets.
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    ious = evaluation.params.iouThrs

    def mean(p):
        valid = p[p > -1]
        return 100 * float(valid.mean()) if valid.size else float("nan")

    at = {t: int(np.abs(ious - t).argmin()) for t in (0.5, 0.75)}
    return mean(precision), mean(precision[at[0.5]]), mean(precision[at[0.75]])


def ablate(cfg, model, gt, image_id: int, image: str, args) -> None:
    """Merges predict's own windows of ``--tile-overlap args.ablate`` again, rule by rule."""
    recorded = []
    merge = TiledPredictor.merge

    def recording(tiler, windows, detections, image_size):
        recorded.append((tiler, windows, detections, image_size))
        return merge(tiler, windows, detections, image_size)

    TiledPredictor.merge = recording  # measurement only: keep what predict merged
    try:
        predict(cfg, model, [image], os.path.join(args.out, "ablate"), tile=args.tile,
                tile_overlap=args.ablate)
    finally:
        TiledPredictor.merge = merge
    ((tiler, windows, detections, image_size),) = recorded
    category_ids = dict(enumerate(dataset_categories(cfg).ids))
    pp = tiler.postprocessing
    never = -1e9  # an edge margin no box is within: nothing is handed over
    margin, cover = tiler.edge_margin, tiler.cover
    variants = [(f"margin {m:g} px, cover {cover:g} + NMS", m, cover, pp) for m in (0, 2, 8, 16)]
    variants += [(f"margin {margin:g} px, cover {c:g} + NMS", margin, c, pp)
                 for c in (0.0, 0.3, 0.5, 0.7, 0.9)]
    variants += [
        ("NMS only (no hand-over)", never, cover, pp),
        ("hand-over only (no NMS)", margin, cover, dataclasses.replace(pp, nms_thresh=1.0)),
        ("neither: all windows' boxes", never, cover, dataclasses.replace(pp, nms_thresh=1.0)),
        ("default rules, no whole-image limit", margin, cover,
         dataclasses.replace(pp, max_detections=10**6)),
    ]
    print(f"merge of the {len(windows)} windows of --tile {args.tile} --tile-overlap "
          f"{args.ablate:g}, rule by rule:")
    for name, margin, cover, postprocessing in variants:
        tiler.edge_margin, tiler.cover, tiler.postprocessing = margin, cover, postprocessing
        merged = merge(tiler, windows, detections, image_size)
        ap = score(gt, instances_to_coco_results(merged, image_id, category_ids), (1, 10, 10000))
        print(f"  {name:<32} {ap[0]:6.2f} {ap[1]:6.2f} {ap[2]:6.2f} {len(merged):6d}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-file", default="configs/demo_deepforest_mobilenet_v2_fpn_long.yaml"
    )
    parser.add_argument("--weights", required=True)
    parser.add_argument("--tile", type=int, default=400)
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--out", default="output/tiled_predict")
    parser.add_argument(
        "--ablate", type=float, nargs="?", const=0.25, default=None, metavar="F",
        help="merge the windows of --tile-overlap F again without each rule",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    root = default_root()
    cfg = load_cfg(
        args.config_file, ["MODEL.MOBILENET.PRETRAINED", "False", *args.opts],
        weights=args.weights,
    )
    model = load_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        gt = COCO(whole_image_ground_truth(os.path.join(root, "raw"), tmp))
    (image_id,) = gt.getImgIds()
    image = os.path.join(root, "raw", STEM + ".png")

    runs = [("untiled", {})] + [
        (f"--tile {args.tile} --tile-overlap {f:g}", {"tile": args.tile, "tile_overlap": f})
        for f in args.overlaps
    ]
    print(f"{len(gt.getAnnIds())} annotated crowns on {STEM}.png "
          f"({gt.imgs[image_id]['width']} x {gt.imgs[image_id]['height']}); {args.weights}")
    print(f"{'run':<34} {'AP':>6} {'AP50':>6} {'AP75':>6} {'dets':>6} {'s':>6}")
    for name, kwargs in runs:
        out = os.path.join(args.out, name.replace("--", "").replace(" ", "_") or "untiled")
        start = time.perf_counter()
        _, summary = predict(cfg, model, [image], out, **kwargs)
        seconds = time.perf_counter() - start
        with open(summary["results_file"]) as f:
            results = [dict(r, image_id=image_id) for r in json.load(f)]
        ap = score(gt, results, (1, 10, 10000))
        print(f"{name:<34} {ap[0]:6.2f} {ap[1]:6.2f} {ap[2]:6.2f} {len(results):6d} "
              f"{seconds:6.1f}")

    if args.ablate is not None:
        ablate(cfg, model, gt, image_id, image, args)

    # The demo's evaluation today: the 16 validation tiles against val.json (dataset image ids).
    val_tiles = os.path.join(root, "images", f"{STEM}_x*_y*.png")
    start = time.perf_counter()
    _, summary = predict(cfg, model, [val_tiles], os.path.join(args.out, "val_tiles"))
    seconds = time.perf_counter() - start
    with open(summary["results_file"]) as f:
        results = json.load(f)
    ap = score(os.path.join(root, "val.json"), results)
    print(f"{'val tiles (val.json, maxDets 100)':<34} {ap[0]:6.2f} {ap[1]:6.2f} {ap[2]:6.2f} "
          f"{len(results):6d} {seconds:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
