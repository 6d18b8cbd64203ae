"""Run an exported RetinaNet ONNX file with nothing but numpy, onnxruntime and OpenCV.

No torch, detectron2 or retinanet_plugin is needed: the file (written by
``python -m retinanet_plugin.tools.export``) takes images as ``cv2.imread`` gives them and does
the resize, normalisation and NMS itself; its metadata names the classes. Example::

    python examples/deploy_onnxruntime.py --model output/demo/model.onnx \\
        --input datasets/deepforest/images/*_541000_*.png --output output/deploy

The graph (metadata ``input_layout`` "NHWC_uint8_BGR_raw"):

- input ``images``: (N, H, W, 3) uint8 BGR, any H and W, one size per batch;
- outputs ``num_detections`` (N,) int64 and, padded with zeros to D =
  ``detections_per_image``, ``boxes`` (N, D, 4) float32 XYXY in the input's pixels, ``scores``
  (N, D) float32 (decreasing) and ``classes`` (N, D) int64;
- metadata ``retinanet_plugin.metadata`` (JSON): ``class_names``, ``category_ids`` (the COCO
  category id of each class), ``score_thresh_test`` (already applied inside), the config.

Writes to ``--output``: each image drawn (same file name; a video as ``<name>.mp4``) with the
detections scoring at least ``--draw-thresh``, and ``coco_instances_results.json``, every
detection as a COCO result (``image_id``, ``category_id`` from the metadata, ``bbox`` XYWH,
``score``). Image ids are ``--image-ids`` in input order, or sequential from ``--first-image-id``
(a video: one id per frame). An int8 file of ``retinanet_plugin.tools.quantize`` runs the same
way.
"""

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime

METADATA_KEY = "retinanet_plugin.metadata"
RAW_LAYOUT = "NHWC_uint8_BGR_raw"
VIDEO_SUFFIXES = {".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm"}
RESULTS_FILE = "coco_instances_results.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported ONNX file (raw-image input)")
    parser.add_argument("--input", nargs="+", required=True, help="image files, or one video")
    parser.add_argument("--output", required=True, help="folder for drawings and the JSON")
    parser.add_argument(
        "--image-ids", type=int, nargs="+", default=None,
        help="COCO image id of each input image, in order (default: sequential)",
    )
    parser.add_argument("--first-image-id", type=int, default=1, help="first sequential id")
    parser.add_argument(
        "--draw-thresh", type=float, default=0.5, help="draw detections scoring at least this"
    )
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all)")
    return parser.parse_args(argv)


class Detector:
    """An onnxruntime session of the exported file, with its metadata."""

    def __init__(self, path: str, threads: int = 0):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # onnxruntime's notes about skipped optimisations
        self.session = onnxruntime.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise SystemExit(
                f"{path} has no {METADATA_KEY} metadata: export it again with "
                "python -m retinanet_plugin.tools.export"
            )
        self.metadata = json.loads(props[METADATA_KEY])
        layout = self.metadata.get("input_layout")
        if layout != RAW_LAYOUT:
            raise SystemExit(
                f"{path} takes {layout!r} input; this example feeds raw images "
                f"({RAW_LAYOUT}): export without the pre-resized input"
            )
        self.class_names = list(self.metadata["class_names"])
        self.category_ids = list(self.metadata["category_ids"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray):
        """(N, H, W, 3) uint8 BGR -> per image (boxes (M, 4) XYXY, scores (M,), classes (M,))."""
        counts, boxes, scores, classes = self.session.run(None, {self.input_name: images})
        return [(boxes[i, :n], scores[i, :n], classes[i, :n]) for i, n in enumerate(counts)]


def coco_results(image_id: int, detections, category_ids) -> list:
    """One image's detections as COCO results: XYWH boxes, the dataset's category ids."""
    boxes, scores, classes = detections
    xywh = boxes.astype(np.float64)
    xywh[:, 2:] -= xywh[:, :2]
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category_ids[int(c)]),
            "bbox": [float(v) for v in box],
            "score": float(s),
        }
        for box, s, c in zip(xywh, scores.astype(np.float64), classes)
    ]


def _color(class_index: int):
    # A fixed, well-spread hue per class (BGR).
    hue = np.uint8((class_index * 47) % 180)
    bgr = cv2.cvtColor(np.array([[[hue, 200, 255]]], dtype=np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
    return tuple(int(v) for v in bgr)


def draw(image: np.ndarray, detections, class_names, thresh: float) -> np.ndarray:
    """A copy of ``image`` with boxes and "name score" labels of detections scoring >= thresh.

    A label sits above its box, or inside it when the box touches the top edge, and is shifted
    left when it would run past the right edge, so no label is cut off.
    """
    out = image.copy()
    height, width = out.shape[:2]
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, min(height, width) / 1000)
    thickness = max(1, round(min(height, width) / 500))
    boxes, scores, classes = detections
    for box, score, cls in zip(boxes, scores, classes):
        if score < thresh:
            continue
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        color = _color(int(cls))
        cv2.rectangle(out, (x0, y0), (x1, y1), color, thickness)
        name = class_names[int(cls)] if int(cls) < len(class_names) else f"class {int(cls)}"
        label = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(label, font, scale, 1)
        lw, lh = tw + 2, th + base + 2
        lx, top = label_position(x0, y0, lw, lh, width, height)
        cv2.rectangle(out, (lx, top), (lx + lw - 1, top + lh - 1), color, cv2.FILLED)
        cv2.putText(out, label, (lx + 1, top + th + 1), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def label_position(x0: int, y0: int, label_w: int, label_h: int, width: int, height: int):
    """Top-left corner of a label_w x label_h label for a box whose top-left corner is (x0, y0):
    above the box, or just inside its top when there is no room above; moved left and up as
    needed to stay within the width x height image (when the label fits in it at all)."""
    top = y0 - label_h if y0 - label_h >= 0 else max(y0, 0)
    top = min(top, max(height - label_h, 0))
    left = min(max(x0, 0), max(width - label_w, 0))
    return left, top


def _image_ids(args, count: int):
    if args.image_ids is None:
        return list(range(args.first_image_id, args.first_image_id + count))
    if len(args.image_ids) != count:
        raise SystemExit(f"--image-ids gives {len(args.image_ids)} ids for {count} inputs")
    return list(args.image_ids)


def run_images(detector: Detector, paths, args, out_dir: Path) -> list:
    results = []
    for path, image_id in zip(paths, _image_ids(args, len(paths))):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"OpenCV cannot read image {path}")
        (detections,) = detector(image[None])
        results += coco_results(image_id, detections, detector.category_ids)
        drawn = draw(image, detections, detector.class_names, args.draw_thresh)
        target = out_dir / Path(path).name
        if not cv2.haveImageWriter(str(target)):
            target = target.with_suffix(".png")
        if target.resolve() == Path(path).resolve():
            raise SystemExit(f"--output would overwrite the input {path}; choose another folder")
        if not cv2.imwrite(str(target), drawn):
            raise SystemExit(f"cannot write {target}")
    return results


def run_video(detector: Detector, path: Path, args, out_dir: Path) -> list:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SystemExit(f"OpenCV cannot open video {path}")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    writer, results = None, []
    image_id = args.image_ids[0] if args.image_ids else args.first_image_id
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            (detections,) = detector(frame[None])
            results += coco_results(image_id, detections, detector.category_ids)
            image_id += 1
            drawn = draw(frame, detections, detector.class_names, args.draw_thresh)
            if writer is None:
                target = out_dir / (path.stem + ".mp4")
                if target.resolve() == path.resolve():
                    raise SystemExit(
                        f"--output would overwrite the input {path}; choose another folder"
                    )
                writer = cv2.VideoWriter(
                    str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, drawn.shape[1::-1]
                )
                if not writer.isOpened():
                    raise SystemExit(f"OpenCV cannot write video {target}")
            writer.write(drawn)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if writer is None:
        raise SystemExit(f"OpenCV cannot decode a frame of video {path}")
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    detector = Detector(args.model, args.threads)
    inputs = [Path(p) for p in args.input]
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise SystemExit(f"no such file: {', '.join(missing)}")
    videos = [p for p in inputs if p.suffix.lower() in VIDEO_SUFFIXES]
    if videos and len(inputs) > 1:
        raise SystemExit("give either image files or one video")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    if videos:
        results = run_video(detector, videos[0], args, out_dir)
    else:
        results = run_images(detector, inputs, args, out_dir)
    results_file = out_dir / RESULTS_FILE
    partial = results_file.with_suffix(".json.partial")
    partial.write_text(json.dumps(results))
    partial.replace(results_file)
    print(f"{len(results)} detections -> {results_file}")


if __name__ == "__main__":
    main()
