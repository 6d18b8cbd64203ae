"""Final suppression of one image's candidates: hard NMS (torchvision, via detectron2's
``batched_nms``) against our soft-NMS (linear, Gaussian) and box voting, side by side.

Candidates like RetinaNet's before NMS: ``--candidates`` boxes in clusters of 20 around
``--candidates // 20`` objects (jittered copies, as neighbouring anchors give), over
``--classes`` classes, scores in (0, 1). Soft-NMS runs ``--max-detections`` steps (the number of
detections kept), each O(candidates). Median time of ``--repeats`` runs, milliseconds.

Usage: python benchmarks/soft_nms.py [--device cpu|cuda] [--candidates 5000]
    [--max-detections 300] [--classes 1] [--repeats 20]
"""

import argparse
import statistics
import time

import torch

from detectron2.layers import batched_nms

from retinanet_plugin.nms import box_voting, soft_nms


def make_candidates(num, num_classes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(num // 20, 2, generator=g) * 800
    sizes = 16 + torch.rand(num // 20, 2, generator=g) * 100
    centers = centers.repeat_interleave(20, dim=0) + torch.randn(num // 20 * 20, 2, generator=g) * 4
    jitter = 1 + 0.1 * torch.randn(len(centers), 1, generator=g)
    sizes = sizes.repeat_interleave(20, dim=0) * jitter
    boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], dim=1)
    scores = torch.rand(len(boxes), generator=g)
    classes = torch.randint(num_classes, (len(boxes),), generator=g)
    return boxes.to(device), scores.to(device), classes.to(device)


def timed(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--candidates", type=int, default=5000)
    parser.add_argument("--max-detections", type=int, default=300)
    parser.add_argument("--classes", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    boxes, scores, classes = make_candidates(args.candidates, args.classes, args.device)

    def hard():
        return batched_nms(boxes, scores, classes, 0.5)[: args.max_detections]

    def soft(method):
        return lambda: soft_nms(
            boxes, scores, classes, method=method, iou_threshold=0.5, sigma=0.5,
            score_threshold=0.001, max_detections=args.max_detections,
        )  # fmt: skip

    def hard_vote():
        keep = hard()
        return box_voting(boxes[keep], classes[keep], boxes, scores, classes, 0.8)

    methods = {
        "hard NMS": hard,
        "hard NMS + box voting": hard_vote,
        "soft-NMS linear": soft("linear"),
        "soft-NMS gaussian": soft("gaussian"),
    }
    print(
        f"{args.candidates} candidates, {args.classes} class(es), {args.max_detections} "
        f"detections kept, {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    base = None
    for name, fn in methods.items():
        ms = timed(fn, args.device, args.repeats)
        base = base or ms
        print(f"| {name} | {ms:.1f} | {ms / base:.1f}x |")


if __name__ == "__main__":
    main()
