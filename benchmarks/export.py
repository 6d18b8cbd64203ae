"""Eager FocalRetinaNet against its ONNX (onnxruntime) and TorchScript exports, side by side.

Exports the model of ``--config-file`` / ``--weights`` in both formats, checks both against the
eager model on the images (detection counts, largest box and score differences), then times
whole single-image inference, image tensor to detections, for the three runtimes in turn within
each repeat (so a change in machine load hits all three) and prints the median per image.
All three run on CPU with ``--threads`` threads (torch and onnxruntime alike).

Example (the demo model on its 16 validation tiles)::

    OMP_NUM_THREADS=1 python benchmarks/export.py \\
        --config-file configs/demo_deepforest_mobilenet_v2_fpn.yaml \\
        --weights output/demo/model_final.pth --images datasets/deepforest/images/*_541000_*
"""

import argparse
import os
import statistics
import tempfile
import time

import onnxruntime
import torch

from detectron2.data.detection_utils import read_image

from retinanet_plugin.export import check_parity, export_model, load_exported
from retinanet_plugin.tools.model_setup import load_cfg, load_model, to_model_input


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
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_cfg(args.config_file, args.opts, weights=args.weights, device="cpu")
    model = load_model(cfg)
    images = [to_model_input(cfg, read_image(p, format=cfg.INPUT.FORMAT)) for p in args.images]
    sizes = sorted({f"{im.shape[2]}x{im.shape[1]}" for im in images})
    print(f"{len(images)} images ({', '.join(sizes)}), {args.threads} thread(s)")

    runners = {"eager": None}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.ts")):
            path = os.path.join(tmp, name)
            start = time.perf_counter()
            export_model(model, images[0], path, fmt)
            elapsed = time.perf_counter() - start
            run = load_exported(path, fmt)
            if fmt == "onnx":  # same thread count as torch
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = args.threads
                options.inter_op_num_threads = 1
                session = onnxruntime.InferenceSession(
                    path, options, providers=["CPUExecutionProvider"]
                )

                def run(image, session=session):
                    outputs = session.run(None, {"image": image.numpy()})
                    return [torch.from_numpy(o) for o in outputs]

            report = check_parity(model, run, images)
            print(
                f"{fmt}: exported in {elapsed:.1f} s, {os.path.getsize(path) / 2**20:.1f} MiB; "
                f"parity on {report.num_images} images, {report.num_detections} detections: "
                f"max box diff {report.max_box_diff:.2e} px, max score diff "
                f"{report.max_score_diff:.2e}"
            )
            runners[fmt] = run

        def run_eager(image):
            with torch.no_grad():
                return model([{"image": image}])

        runners["eager"] = run_eager
        for run in runners.values():
            for image in images[: args.warmup]:
                run(image)
        times = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                for image in images:
                    start = time.perf_counter()
                    run(image)
                    times[name].append(time.perf_counter() - start)
    eager_ms = statistics.median(times["eager"]) * 1e3
    print("| runtime | median ms / image | eager / this |")
    print("|---|---:|---:|")
    for name, samples in times.items():
        ms = statistics.median(samples) * 1e3
        print(f"| {name} | {ms:.1f} | {eager_ms / ms:.2f}x |")


if __name__ == "__main__":
    main()
