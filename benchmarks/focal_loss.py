"""Focal loss forward + backward at RetinaNet's real shape, ours against the references.

Shape: 2 images at 800x1333 (padded to 800x1344): P3-P7 give 16800 + 4200 + 1050 + 273 + 77 =
22400 locations x 9 anchors = 201,600 anchors per image, 403,200 in all, x 80 classes, about
0.1% foreground and some ignored anchors. Each method computes the classification loss the way a
detector calls it, from class-index labels:

* fvcore_jit: what detectron2's RetinaNet does (one-hot target, ``sigmoid_focal_loss_jit``);
* fvcore: the same with fvcore's eager ``sigmoid_focal_loss``;
* torchvision: the same with ``torchvision.ops.sigmoid_focal_loss``;
* ours: ``sigmoid_focal_loss_from_labels`` (fused, no one-hot).

Each method runs in its own process so that peak memory can be read from the OS (CPU) or the
allocator (GPU); it is the peak above the inputs, after warming up (compilation) on a small
input. Times are medians. On a GPU the bandwidth bound (read logits and labels once, write the
gradient once, at the bandwidth a plain copy reaches) is printed too.

Usage: python benchmarks/focal_loss.py [--device cpu|cuda] [--repeats 5]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

NUM_ANCHORS = 403_200
NUM_CLASSES = 80
METHODS = ["fvcore_jit", "fvcore", "torchvision", "ours"]


def make_inputs(num_anchors, num_classes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Logits of a partly trained detector: most negatives confidently low, a spread above.
    # Built in place: a temporary here would raise the process's peak memory above the level
    # the measurement starts from, hiding what the loss itself allocates.
    logits = torch.empty(num_anchors, num_classes).normal_(generator=g).mul_(2).sub_(5)
    labels = torch.full((num_anchors,), num_classes, dtype=torch.long)
    perm = torch.randperm(num_anchors, generator=g)
    num_pos, num_ignored = num_anchors // 1000, num_anchors // 50
    labels[perm[:num_pos]] = torch.randint(0, num_classes, (num_pos,), generator=g)
    labels[perm[num_pos:num_pos + num_ignored]] = -1
    return logits.to(device), labels.to(device)


def loss_fn(method):
    if method == "ours":
        from retinanet_plugin.losses import sigmoid_focal_loss_from_labels

        return lambda x, labels: sigmoid_focal_loss_from_labels(x, labels, 0.25, 2.0, "sum")
    if method == "fvcore_jit":
        from fvcore.nn import sigmoid_focal_loss_jit as fn
    elif method == "fvcore":
        from fvcore.nn import sigmoid_focal_loss as fn
    else:
        from torchvision.ops import sigmoid_focal_loss as fn

    def dense(x, labels):
        valid = labels >= 0
        target = F.one_hot(labels[valid], x.shape[1] + 1)[:, :-1].to(x.dtype)
        return fn(x[valid], target, alpha=0.25, gamma=2.0, reduction="sum")

    return dense


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(fn, logits, labels):
    x = logits.detach().requires_grad_()
    fn(x, labels).backward()
    return x.grad


def run_one(method, device, repeats, num_anchors):
    fn = loss_fn(method)
    for _ in range(3):  # compilation / JIT profiling on a small input
        step(fn, *make_inputs(2048, NUM_CLASSES, device, seed=1))
    logits, labels = make_inputs(num_anchors, NUM_CLASSES, device)
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grad = step(fn, logits, labels)
    sync(device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    checksum = float(grad.double().abs().sum())
    del grad
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step(fn, logits, labels)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"time": statistics.median(times), "peak": peak, "checksum": checksum}


def copy_bound(device, num_anchors, repeats):
    """Seconds to read logits + labels once and write a gradient once, at copy bandwidth."""
    x = torch.empty(num_anchors, NUM_CLASSES, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    copy_bytes = 2 * x.numel() * 4
    bandwidth = copy_bytes / statistics.median(times)
    needed = x.numel() * 4 * 2 + num_anchors * 8
    return needed / bandwidth, bandwidth


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--anchors", type=int, default=NUM_ANCHORS)
    parser.add_argument("--method", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args.method, args.device, args.repeats, args.anchors)))
        return

    results = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--method", method, "--device", args.device,
               "--repeats", str(args.repeats), "--anchors", str(args.anchors)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])

    ref = results["fvcore_jit"]
    print(f"focal loss forward+backward, {args.anchors} anchors x {NUM_CLASSES} classes, "
          f"device={args.device}, torch {torch.__version__}, threads={torch.get_num_threads()}")
    print(f"{'method':<12} {'time (ms)':>10} {'speed-up vs fvcore_jit':>23} "
          f"{'peak extra (MiB)':>17} {'memory vs fvcore_jit':>21}")
    for method, r in results.items():
        print(f"{method:<12} {r['time'] * 1e3:>10.1f} {ref['time'] / r['time']:>22.1f}x "
              f"{r['peak'] / 2**20:>17.0f} {r['peak'] / max(ref['peak'], 1):>21.3f}")
    rel = abs(results["ours"]["checksum"] - ref["checksum"]) / ref["checksum"]
    print(f"gradient checksum, ours vs fvcore_jit: relative difference {rel:.2e}")
    if args.device.startswith("cuda"):
        bound, bandwidth = copy_bound(args.device, args.anchors, args.repeats)
        print(f"bandwidth bound {bound * 1e3:.2f} ms at {bandwidth / 1e9:.0f} GB/s (copy); "
              f"ours is {results['ours']['time'] / bound:.2f}x the bound")


if __name__ == "__main__":
    main()
