"""Focal loss forward + backward at RetinaNet's real shape, ours against the references.

Shape: 2 images at 800x1333 (padded to 800x1344): P3-P7 give 16800 + 4200 + 1050 + 273 + 77 =
22400 locations x 9 anchors = 201,600 anchors per image, 403,200 in all, x 80 classes, about
0.1% foreground and 2% ignored anchors.

Part 1, the loss alone, from (M, K) logits and class-index labels:

* fvcore_jit: what detectron2's RetinaNet does (one-hot target, ``sigmoid_focal_loss_jit``);
* fvcore: the same with fvcore's eager ``sigmoid_focal_loss``;
* torchvision: the same with ``torchvision.ops.sigmoid_focal_loss``;
* ours: ``sigmoid_focal_loss_from_labels`` (fused, no one-hot).

Part 2, the detector's whole classification-loss path, from the head's per-level
(N, A*K, Hi, Wi) logits and the (N, R) matched labels to the gradient on those logits:

* d2_path: detectron2's ``RetinaNet.losses``: permute + cat to (N, R, K), one-hot, fvcore jit;
* ours_cat: the same concatenation, then ``sigmoid_focal_loss_from_labels``;
* ours_levels: ``sigmoid_focal_loss_per_level``, in the head's layout (what FocalRetinaNet does).

Timing: all methods of a part run in this one process, interleaved (A B C A B C ...), each
``--repeats`` times after a warm-up; the table gives the median and the spread (min - max). The
load of the machine during the timing is read from /proc/stat: the CPU time of all processes
minus this one's, in cores. Peak extra memory (part 1) is measured in one child process per
method, from the OS (CPU) or the allocator (GPU), above the inputs, after warming up.

The machine bound: our kernel must read the logits (and labels) once and write the gradient
once, and evaluate one exp and one log1p per element. The benchmark measures both on this
machine: a copy of the same bytes (``copy_``), and a compiled tight loop computing
``log1p(exp(-|x|))`` summed (the transcendental throughput, one read, no write); the bound is the
larger of the two, and ours is printed as a multiple of it.

Usage: python benchmarks/focal_loss.py [--device cpu|cuda] [--repeats 5] [--no-memory]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

NUM_CLASSES = 80
NUM_ANCHORS_PER_LOCATION = 9
# P3-P7 of an 800x1344 padded input (strides 8..128), 2 images.
LEVEL_SHAPES = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
NUM_IMAGES = 2
NUM_ANCHORS = NUM_IMAGES * NUM_ANCHORS_PER_LOCATION * sum(h * w for h, w in LEVEL_SHAPES)
METHODS = ["fvcore_jit", "fvcore", "torchvision", "ours"]
PATH_METHODS = ["d2_path", "ours_cat", "ours_levels"]


def make_labels(num_anchors, num_classes, device, g):
    labels = torch.full((num_anchors,), num_classes, dtype=torch.long)
    perm = torch.randperm(num_anchors, generator=g)
    num_pos, num_ignored = num_anchors // 1000, num_anchors // 50
    labels[perm[:num_pos]] = torch.randint(0, num_classes, (num_pos,), generator=g)
    labels[perm[num_pos:num_pos + num_ignored]] = -1
    return labels.to(device)


def make_inputs(num_anchors, num_classes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Logits of a partly trained detector: most negatives confidently low, a spread above.
    # Built in place: a temporary here would raise the process's peak memory above the level
    # the measurement starts from, hiding what the loss itself allocates.
    logits = torch.empty(num_anchors, num_classes).normal_(generator=g).mul_(2).sub_(5)
    return logits.to(device), make_labels(num_anchors, num_classes, device, g)


def make_level_inputs(level_shapes, device, seed=0):
    """The head's per-level logits (N, A*K, Hi, Wi) and the matched labels (N, R)."""
    g = torch.Generator().manual_seed(seed)
    a, k = NUM_ANCHORS_PER_LOCATION, NUM_CLASSES
    levels = [torch.empty(NUM_IMAGES, a * k, h, w).normal_(generator=g).mul_(2).sub_(5)
              .to(device) for h, w in level_shapes]
    r = a * sum(h * w for h, w in level_shapes)
    labels = make_labels(NUM_IMAGES * r, k, device, g).view(NUM_IMAGES, r)
    return levels, labels


def _dense_fn(name):
    if name == "fvcore_jit":
        from fvcore.nn import sigmoid_focal_loss_jit as fn
    elif name == "fvcore":
        from fvcore.nn import sigmoid_focal_loss as fn
    else:
        from torchvision.ops import sigmoid_focal_loss as fn
    return fn


def loss_fn(method):
    """``fn(logits (M, K), labels (M,)) -> scalar`` as a detector would call it."""
    if method == "ours":
        from retinanet_plugin.losses import sigmoid_focal_loss_from_labels

        return lambda x, labels: sigmoid_focal_loss_from_labels(x, labels, 0.25, 2.0, "sum")
    fn = _dense_fn(method)

    def dense(x, labels):
        # detectron2's RetinaNet.losses: one-hot over K + 1, background column dropped.
        valid = labels >= 0
        target = F.one_hot(labels[valid], x.shape[1] + 1)[:, :-1].to(x.dtype)
        return fn(x[valid], target, alpha=0.25, gamma=2.0, reduction="sum")

    return dense


def path_fn(method):
    """``fn(levels [(N, A*K, Hi, Wi)], labels (N, R)) -> scalar``: the detector's whole path."""
    from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K

    from retinanet_plugin.losses import sigmoid_focal_loss_per_level

    if method == "ours_levels":
        return lambda levels, labels: sigmoid_focal_loss_per_level(levels, labels, 0.25, 2.0)
    flat = loss_fn("fvcore_jit" if method == "d2_path" else "ours")

    def concatenated(levels, labels):
        logits = torch.cat([permute_to_N_HWA_K(x, NUM_CLASSES) for x in levels], dim=1)
        return flat(logits.reshape(-1, NUM_CLASSES), labels.reshape(-1))

    return concatenated


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(fn, logits, labels):
    """One forward + backward; returns the gradient(s) on the logits."""
    if isinstance(logits, list):
        xs = [x.detach().requires_grad_() for x in logits]
        fn(xs, labels).backward()
        return [x.grad for x in xs]
    x = logits.detach().requires_grad_()
    fn(x, labels).backward()
    return x.grad


def checksum(grad):
    grads = grad if isinstance(grad, list) else [grad]
    return float(sum(g.double().abs().sum() for g in grads))


def peak_memory(method, device, num_anchors):
    """Child process: peak bytes above the inputs of one step of ``method`` (part 1)."""
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
    step(fn, logits, labels)
    sync(device)
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


class LoadMeter:
    """CPU time used by other processes while it runs, from /proc/stat (Linux; else None)."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        busy = _busy_seconds()
        self.others = None
        if busy is not None and self.busy0 is not None:
            self.others = max(busy - self.busy0 - (_own_seconds() - self.own0), 0.0) / self.wall

    def describe(self):
        if self.others is None:
            return "load of other processes: unknown (no /proc/stat)"
        verdict = "QUIET" if self.others < 0.1 else "UNDER LOAD (figures are not quiet-machine)"
        with open("/proc/loadavg") as f:
            loadavg = " ".join(f.read().split()[:3])
        return (f"other processes used {self.others:.2f} cores on average during the timing "
                f"({os.cpu_count()} cores, loadavg {loadavg}): {verdict}")


def _busy_seconds():
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def interleaved(fns, inputs, device, repeats):
    """Per method, the list of ``repeats`` timings, the methods run A B C A B C ..."""
    for fn in fns.values():  # warm-up at full size (compilation, allocator)
        step(fn, *inputs)
    times = {name: [] for name in fns}
    with LoadMeter() as load:
        for _ in range(repeats):
            for name, fn in fns.items():
                sync(device)
                t0 = time.perf_counter()
                step(fn, *inputs)
                sync(device)
                times[name].append(time.perf_counter() - t0)
    return times, load


def machine_bound(logits, device, repeats):
    """(copy seconds, transcendental seconds) for the logits' size on this machine."""
    y = torch.empty_like(logits)
    tight = torch.compile(lambda x: torch.log1p(torch.exp(-x.abs())).sum())
    tight(logits)
    copies, tights = [], []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(logits)
        sync(device)
        copies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tight(logits)
        sync(device)
        tights.append(time.perf_counter() - t0)
    return statistics.median(copies), statistics.median(tights)


def summary(ts):
    return statistics.median(ts), min(ts), max(ts)


def print_table(title, times, ref, peaks=None):
    print(title)
    header = f"{'method':<12} {'median ms':>10} {'spread (min-max) ms':>20} {'x vs ' + ref:>16}"
    if peaks:
        header += f" {'peak extra MiB':>15} {'memory vs ' + ref:>20}"
    print(header)
    ref_median = statistics.median(times[ref])
    for name, ts in times.items():
        med, lo, hi = summary(ts)
        line = (f"{name:<12} {med * 1e3:>10.1f} {f'{lo * 1e3:.1f} - {hi * 1e3:.1f}':>20} "
                f"{ref_median / med:>15.1f}x")
        if peaks:
            line += (f" {peaks[name] / 2**20:>15.0f} "
                     f"{peaks[name] / max(peaks[ref], 1):>20.3f}")
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--anchors", type=int, default=NUM_ANCHORS,
                        help="part 1 only; part 2 uses the real level shapes")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--small", action="store_true",
                        help="a quick check of the script: 20,000 anchors, levels 1/8 the size")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 (median and spread of at least 5 runs)")
    if args.memory_of:
        print(json.dumps(peak_memory(args.memory_of, args.device, args.anchors)))
        return

    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"focal loss forward+backward, device={args.device}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, {now}")
    peaks = None
    if not args.no_memory:
        peaks = {}
        for method in METHODS:
            cmd = [sys.executable, __file__, "--memory-of", method, "--device", args.device,
                   "--anchors", str(args.anchors)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            peaks[method] = json.loads(out.strip().splitlines()[-1])

    level_shapes = LEVEL_SHAPES
    if args.small:
        args.anchors = 20_000
        level_shapes = [((h + 7) // 8, (w + 7) // 8) for h, w in LEVEL_SHAPES]
    logits, labels = make_inputs(args.anchors, NUM_CLASSES, args.device)
    fns = {m: loss_fn(m) for m in METHODS}
    times, load = interleaved(fns, (logits, labels), args.device, args.repeats)
    print_table(f"\n1. the loss alone: {args.anchors} anchors x {NUM_CLASSES} classes",
                times, "fvcore_jit", peaks)
    print(load.describe())
    ref = checksum(step(fns["fvcore_jit"], logits, labels))
    rel = abs(checksum(step(fns["ours"], logits, labels)) - ref) / ref
    print(f"gradient checksum, ours vs fvcore_jit: relative difference {rel:.2e}")
    if peaks is not None:
        grad_mib = logits.numel() * logits.element_size() / 2**20
        print(f"(the gradient alone is {grad_mib:.0f} MiB)")
    copy_s, tight_s = machine_bound(logits, args.device, args.repeats)
    bound = max(copy_s, tight_s)
    ours = statistics.median(times["ours"])
    print(f"machine bound: copy of the logits' bytes {copy_s * 1e3:.1f} ms "
          f"({2 * logits.numel() * 4 / copy_s / 1e9:.1f} GB/s), exp + log1p tight loop "
          f"{tight_s * 1e3:.1f} ms; ours (forward + backward) is {ours / bound:.2f}x the bound")
    del logits, labels

    levels, level_labels = make_level_inputs(level_shapes, args.device)
    fns = {m: path_fn(m) for m in PATH_METHODS}
    times, load = interleaved(fns, (levels, level_labels), args.device, args.repeats)
    print_table(f"\n2. the detector's classification-loss path: {NUM_IMAGES} images, levels "
                f"{level_shapes}, A={NUM_ANCHORS_PER_LOCATION}, K={NUM_CLASSES}, from the "
                "head's logits to their gradient", times, "d2_path")
    print(load.describe())
    ref = checksum(step(fns["d2_path"], levels, level_labels))
    rel = abs(checksum(step(fns["ours_levels"], levels, level_labels)) - ref) / ref
    print(f"gradient checksum, ours_levels vs d2_path: relative difference {rel:.2e}")


if __name__ == "__main__":
    main()
