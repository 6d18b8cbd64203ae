"""Eager FocalRetinaNet against its ONNX (onnxruntime, float32 and int8) and TorchScript exports,
side by side.

Exports the model of ``--config-file`` / ``--weights`` in both formats (the single-image graph
of resized images, ``--input resized`` of the export tool, so that all runtimes time the same
work: image tensor at the test resolution to detections), checks both against the eager model
on the images (detection counts, largest box and score differences), quantizes the ONNX file to
int8 (:mod:`retinanet_plugin.export.quantize`, ``--calibration-images`` images of the config's
training set), then times whole single-image inference for every runtime in turn within each
repeat (so a change in machine load hits all of them) and prints the median per image and the
spread (lowest and highest of the per-repeat medians). All run on CPU with ``--threads``
threads (torch and onnxruntime alike). With ``--ap``, each runtime's detections of the config's
first test set (``DATASETS.TEST``) are scored by the evaluator ``train_net.py`` uses
(``build_coco_evaluator``: detectron2's ``COCOEvaluator``), the exported files' detections
scaled back to the original images as predict does (``exported_instances``). The load average
(``/proc/loadavg``) before and after is printed: on a shared machine the ratios are the
informative part.

With ``--raw``, the raw-image ONNX file of the export tool's default (``images`` (1, H, W, 3)
uint8 BGR, resize and ``detector_postprocess`` inside, the detector in a ``Loop`` over the
batch) and its int8 copy are timed too, on the original images as ``cv2.imread`` reads them
(rows "onnx raw", "onnx raw int8"): the files ``examples/deploy_onnxruntime.py`` runs.

Example (the demo model on its 16 validation tiles)::

    OMP_NUM_THREADS=1 python benchmarks/export.py \\
        --config-file configs/demo_deepforest_mobilenet_v2_fpn_long.yaml \\
        --weights output/demo/model_final.pth --images datasets/deepforest/images/*_541000_* \
        --ap --raw
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import onnxruntime
import torch

from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.structures import Boxes, Instances

from retinanet_plugin.evaluation import build_coco_evaluator
from retinanet_plugin.export import (
    check_parity,
    check_raw_parity,
    export_model,
    export_raw_model,
    exported_instances,
    load_exported,
    raw_input_spec,
)
from retinanet_plugin.export.quantize import (
    RAW_LAYOUT,
    RESIZED_LAYOUT,
    calibration_inputs,
    onnx_detections,
    quantize_onnx,
)
from retinanet_plugin.tools.model_setup import (
    dataset_view,
    load_cfg,
    load_model,
    test_augmentations,
    test_mapper,
    to_model_input,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", nargs="+", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed runs per runtime first (TorchScript "
        "profiles and optimises its graph during its first runs)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--calibration-images", type=int, default=32,
        help="training images the int8 ranges are measured on (default 32)",
    )
    parser.add_argument(
        "--ap", action="store_true",
        help="also score each runtime on the config's first test set with COCOEvaluator",
    )
    parser.add_argument(
        "--raw", action="store_true",
        help="also time the raw-image ONNX file and its int8 copy on the original images",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    return parser.parse_args()


def _load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _onnx_runner(path: str, threads: int):
    """onnxruntime on one (3, H, W) image with ``threads`` threads (as torch), outputs as
    tensors."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(image):
        outputs = session.run(None, {"image": image.numpy()})
        return [torch.from_numpy(o) for o in outputs]

    return run


def _raw_session(path: str, threads: int):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _raw_instances(session, item) -> Instances:
    """A raw-image file's detections of a test-loader input: the original image read in BGR,
    boxes already in its pixels."""
    image = read_image(item["file_name"], format="BGR")
    boxes, scores, classes = onnx_detections(session, np.ascontiguousarray(image)[None])
    return Instances(
        image.shape[:2],
        pred_boxes=Boxes(torch.from_numpy(boxes)),
        scores=torch.from_numpy(scores),
        pred_classes=torch.from_numpy(classes),
    )


def _average_precision(cfg, model, exported, raw) -> dict:
    """COCO box AP of the eager model and of each exported runtime on the config's first test
    set, through the evaluator ``train_net.py`` builds, the inputs mapped by its test loader's
    mapper."""
    dataset = dataset_view(cfg).DATASETS.TEST[0]
    mapper = test_mapper(cfg)
    inputs = [mapper(dict(record)) for record in DatasetCatalog.get(dataset)]

    def eager(item):
        with torch.no_grad():
            return model([item])[0]["instances"].to("cpu")

    predictors = {"eager": eager}
    for name, run in exported.items():
        predictors[name] = lambda item, run=run: exported_instances(run, item)
    for name, session in raw.items():
        predictors[name] = lambda item, session=session: _raw_instances(session, item)
    aps = {}
    for name, predict in predictors.items():
        evaluator = build_coco_evaluator(dataset)
        evaluator.reset()
        for item in inputs:
            evaluator.process([item], [{"instances": predict(item)}])
        aps[name] = evaluator.evaluate()["bbox"]["AP"]
    return aps


def _raw_files(cfg, model, args, tmp: str) -> dict:
    """The raw-image ONNX file (as the export tool writes it by default), checked against the
    eager model on the images, and its int8 copy: one onnxruntime session each."""
    spec = raw_input_spec(test_mapper(cfg).image_format, test_augmentations(cfg).augs)
    bgr = [np.ascontiguousarray(read_image(p, format="BGR")) for p in args.images]
    path = os.path.join(tmp, "model_raw.onnx")
    start = time.perf_counter()
    export_raw_model(model, spec, torch.from_numpy(bgr[0][None]), path, "onnx")
    elapsed = time.perf_counter() - start
    session = _raw_session(path, args.threads)
    report = check_raw_parity(
        model, spec, test_augmentations(cfg),
        lambda images: [torch.from_numpy(o) for o in session.run(None, {"images": images})],
        bgr,
    )
    print(
        f"onnx raw: exported in {elapsed:.1f} s, {os.path.getsize(path) / 2**20:.1f} MiB; parity "
        f"on {report.num_images} images, {report.num_detections} detections: max box diff "
        f"{report.max_box_diff:.2e} px, max score diff {report.max_score_diff:.2e}"
    )
    int8_path = os.path.join(tmp, "model_raw_int8.onnx")
    start = time.perf_counter()
    calibration = calibration_inputs(cfg, RAW_LAYOUT, args.calibration_images)
    quantization = quantize_onnx(path, int8_path, calibration)
    print(
        f"onnx raw int8: quantized in {time.perf_counter() - start:.1f} s, "
        f"{os.path.getsize(int8_path) / 2**20:.1f} MiB, {quantization.quantized_convs} "
        f"QLinearConv ({quantization.graph}), {quantization.float_convs} Conv left in float32"
    )
    return {"onnx raw": session, "onnx raw int8": _raw_session(int8_path, args.threads)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_cfg(args.config_file, args.opts, weights=args.weights, device="cpu")
    model = load_model(cfg)
    images = [to_model_input(cfg, read_image(p, format=cfg.INPUT.FORMAT)) for p in args.images]
    sizes = sorted({f"{im.shape[2]}x{im.shape[1]}" for im in images})
    print(f"{len(images)} images ({', '.join(sizes)}), {args.threads} thread(s); load average "
          f"at start {_load_average()}")

    def run_eager(image):
        with torch.no_grad():
            return model([{"image": image}])

    runners = {"eager": run_eager}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.ts")):
            path = os.path.join(tmp, name)
            start = time.perf_counter()
            export_model(model, images[0], path, fmt)
            elapsed = time.perf_counter() - start
            run = _onnx_runner(path, args.threads) if fmt == "onnx" else load_exported(path, fmt)
            report = check_parity(model, run, images)
            print(
                f"{fmt}: exported in {elapsed:.1f} s, {os.path.getsize(path) / 2**20:.1f} MiB; "
                f"parity on {report.num_images} images, {report.num_detections} detections: "
                f"max box diff {report.max_box_diff:.2e} px, max score diff "
                f"{report.max_score_diff:.2e}"
            )
            runners[fmt] = run
        int8_path = os.path.join(tmp, "model_int8.onnx")
        start = time.perf_counter()
        calibration = calibration_inputs(cfg, RESIZED_LAYOUT, args.calibration_images)
        quantization = quantize_onnx(os.path.join(tmp, "model.onnx"), int8_path, calibration)
        print(
            f"onnx int8: quantized in {time.perf_counter() - start:.1f} s, "
            f"{os.path.getsize(int8_path) / 2**20:.1f} MiB, {quantization.quantized_convs} "
            f"QLinearConv, {quantization.float_convs} Conv left in float32, "
            f"calibrated on {quantization.calibration_images} training images"
        )
        runners["onnx int8"] = _onnx_runner(int8_path, args.threads)
        # Each runtime's input of each image: the resized tensor, or the raw BGR image.
        inputs = {name: images for name in runners}
        raw_sessions = {}
        if args.raw:
            raw_sessions = _raw_files(cfg, model, args, tmp)
            bgr = [np.ascontiguousarray(read_image(p, format="BGR"))[None] for p in args.images]
            for name, session in raw_sessions.items():
                runners[name] = lambda array, s=session: s.run(None, {"images": array})
                inputs[name] = bgr

        for name, run in runners.items():
            for item in inputs[name][: args.warmup]:
                run(item)
        # times[name][r]: the per-image times of repeat r.
        times = {name: [[] for _ in range(args.repeats)] for name in runners}
        for r in range(args.repeats):
            for name, run in runners.items():
                for item in inputs[name]:
                    start = time.perf_counter()
                    run(item)
                    times[name][r].append(time.perf_counter() - start)
        print(f"load average after timing {_load_average()}")
        aps = {}
        if args.ap:
            aps = _average_precision(
                cfg, model,
                {k: v for k, v in runners.items() if k != "eager" and k not in raw_sessions},
                raw_sessions,
            )
            print(f"load average after AP {_load_average()}")
    eager_ms = statistics.median(sum(times["eager"], [])) * 1e3
    onnx_ms = statistics.median(sum(times["onnx"], [])) * 1e3
    print("| runtime | median ms / image | spread (repeat medians) | eager / this | onnx / this "
          "| AP |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, repeats in times.items():
        ms = statistics.median(sum(repeats, [])) * 1e3
        medians = [statistics.median(t) * 1e3 for t in repeats]
        ap = f"{aps[name]:.2f}" if name in aps else "-"
        print(f"| {name} | {ms:.1f} | {min(medians):.1f} - {max(medians):.1f} | "
              f"{eager_ms / ms:.2f}x | {onnx_ms / ms:.2f}x | {ap} |")
    for fp32, int8 in (("onnx", "onnx int8"), ("onnx raw", "onnx raw int8")):
        if fp32 not in times:
            continue
        ratio = statistics.median(sum(times[fp32], [])) / statistics.median(sum(times[int8], []))
        line = f"{int8} against {fp32}: {ratio:.2f}x faster"
        if fp32 in aps:
            line += f", AP {aps[int8] - aps[fp32]:+.2f}"
        print(line)


if __name__ == "__main__":
    main()
