"""FocalRetinaNet against detectron2's RetinaNet, same weights, timed side by side in one run.

For each model, image size, batch size and score regime it times
  * train: one training step, the step ``train_net.py`` runs: the trainer that
    ``SOLVER.AMP`` selects (``retinanet_plugin.precision.build_step_trainer``: detectron2's
    ``SimpleTrainer``, its ``AMPTrainer`` for float16, ``AutocastTrainer`` for bfloat16) with
    detectron2's ``build_optimizer`` (``SOLVER.BASE_LR`` 0, so the weights stay as they are),
  * infer: whole inference (``model(inputs)`` under ``torch.no_grad``; ``TEST.AMP`` and
    ``MODEL.CHANNELS_LAST`` act inside the model, as in evaluation and predict),
  * post:  post-processing alone (``forward_inference`` on precomputed head outputs),
  * loss:  the training losses alone, from the head's outputs to their gradient
    (``forward_training``: anchor matching, classification and box losses, and backward onto
    the head's outputs),
and prints the median time, the spread (min - max) and the speedup (detectron2's time / ours;
> 1 means ours is faster). With both "train" and "loss", it also prints the loss's share of
each model's training step.

Models (``--models``): "r50", detectron2's COCO R50-FPN RetinaNet at each of ``--sizes``;
"demo", configs/demo_deepforest_mobilenet_v2_fpn.yaml (MobileNetV2-FPN, one class) at its own
test size (400x400), without its ImageNet weights (the speed does not depend on them).

Precision and memory format (``--variants``, train and infer only): detectron2 always runs in
float32; ours runs once per variant, each a config of the plugin's own keys:
  * fp32: the defaults;
  * bf16 / fp16: ``SOLVER.AMP.ENABLED`` + ``SOLVER.AMP.PRECISION`` for the training step,
    ``TEST.AMP.ENABLED`` + ``TEST.AMP.PRECISION`` for inference (fp16: CUDA only);
  * a "-cl" suffix adds ``MODEL.CHANNELS_LAST``.
The machine's limit: the GFLOP/s of a square matmul (2048, on CUDA 8192) in float32 and in each
variant's dtype, on the same threads (on CUDA with the convolutions' TF32 setting), timed among
each row's runs so that it sees the same load; and each row's FLOPs: fvcore's
``FlopCountAnalysis`` of the backbone and head on the padded batch (fvcore counts one
multiply-add as one flop: FLOPs = 2 x its count; post-processing, a few MFLOPs, is left out),
and a training step counted as 3x the forward (forward + backward for inputs and weights; the
frozen stages skip most of their backward, so the step's true work is less and its fraction
an upper bound). "of limit" = FLOPs / time / the dtype's matmul GFLOP/s.

Score regimes:
  * random: the head as initialised (prior bias, Sec. 3.3) on a randomly initialised backbone;
  * trained: the classification bias shifted so that about ``--candidates`` scores per image
    pass the 0.05 threshold, like a trained detector.
The "cand/img" column gives the measured number of scores above the threshold per image.

All runs of one measurement alternate within each repeat (the order reversed every other
repeat), so a change in machine load hits all of them. The script reads /proc/loadavg before
and after, and prints both.

Example (quick):  python benchmarks/retinanet.py --sizes 512x512 --batch-sizes 1 --repeats 2
Precision table:  python benchmarks/retinanet.py --models demo r50 --stages train infer \
                      --scores trained --batch-sizes 1 --variants fp32 bf16 bf16-cl
Full:             python benchmarks/retinanet.py
"""

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

import detectron2
from detectron2 import model_zoo
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from retinanet_plugin import FocalRetinaNet
from retinanet_plugin.precision import build_step_trainer, training_dtype
from retinanet_plugin.tools.model_setup import load_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo_deepforest_mobilenet_v2_fpn.yaml")
R50_CONFIG = "COCO-Detection/retinanet_R_50_FPN_1x.yaml"

# The plugin's keys of each variant (retinanet_plugin/config.py); detectron2 runs none of them.
_PRECISION_KEYS = {
    "fp32": [],
    "bf16": ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16",
             "TEST.AMP.ENABLED", "True", "TEST.AMP.PRECISION", "bfloat16"],
    "fp16": ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "float16",
             "TEST.AMP.ENABLED", "True", "TEST.AMP.PRECISION", "float16"],
}
VARIANTS = [p + cl for p in _PRECISION_KEYS for cl in ("", "-cl")]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["r50"], choices=["r50", "demo"],
                        help="r50: detectron2's R50-FPN at --sizes; demo: the demo config at "
                             "its test size")
    parser.add_argument("--sizes", nargs="+", default=["512x512", "800x1333"],
                        help="image sizes HxW (r50)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--stages", nargs="+", default=["train", "loss", "infer", "post"],
                        choices=["train", "loss", "infer", "post"])
    parser.add_argument("--scores", nargs="+", default=["random", "trained"],
                        choices=["random", "trained"])
    parser.add_argument("--variants", nargs="+", default=["fp32"], choices=VARIANTS,
                        help="ours in these precisions / memory formats (train and infer)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--post-repeats", type=int, default=10,
                        help="timed runs of the (fast) post-processing and loss stages")
    parser.add_argument("--depth", type=int, default=50, help="ResNet depth (50 = R50-FPN)")
    parser.add_argument("--candidates", type=int, default=2000,
                        help="scores above the threshold per image in the 'trained' regime")
    parser.add_argument("--no-flops", action="store_true",
                        help="skip the FLOP count and the matmul limit")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def model_cfg(model: str, variant: str, depth: int, device: str):
    """The config of ``model`` with ``variant``'s keys, through the tools' config loader."""
    precision, _, layout = variant.partition("-")
    opts = ["MODEL.WEIGHTS", "", "SOLVER.BASE_LR", "0.0"] + _PRECISION_KEYS[precision]
    if layout == "cl":
        opts += ["MODEL.CHANNELS_LAST", "True"]
    if model == "demo":
        return load_cfg(DEMO_CONFIG, opts + ["MODEL.MOBILENET.PRETRAINED", "False"],
                        device=device)
    # The model-zoo config names detectron2's RetinaNet; ours reads the precision keys (and
    # the config refuses them for a model that would not), detectron2's is built from it anyway.
    opts += ["MODEL.META_ARCHITECTURE", "FocalRetinaNet", "MODEL.RESNETS.DEPTH", str(depth)]
    if depth in (18, 34):
        opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    return load_cfg(model_zoo.get_config_file(R50_CONFIG), opts, device=device)


@dataclass
class Runner:
    """One model of a comparison: detectron2's (float32) or ours in one variant."""

    name: str
    model: nn.Module
    cfg: object
    dtype: torch.dtype  # the dtype of its convolutions, for the machine limit


def build_runners(model: str, variants: Sequence[str], depth: int, device: str) -> List[Runner]:
    """detectron2's RetinaNet, then ours in each variant, all with the first model's weights.

    detectron2 0.6 cannot build a RetinaNetHead with GroupNorm (the demo's head: it calls
    ``get_norm(norm, 1)``, and GroupNorm(32, 1) is refused); then ours in float32 comes first
    and is the reference of the speedups."""
    cfg = model_cfg(model, "fp32", depth, device)
    torch.manual_seed(0)
    runners = []
    try:
        runners.append(Runner("detectron2 fp32", RetinaNet(cfg), cfg, torch.float32))
    except ValueError as exc:
        print(f"{model}: detectron2 {detectron2.__version__} cannot build this model ({exc}); "
              "ours fp32 is the reference, and the loss and post stages are skipped")
        variants = ["fp32"] + [v for v in variants if v != "fp32"]
    state = runners[0].model.state_dict() if runners else None
    for variant in variants:
        vcfg = model_cfg(model, variant, depth, device)
        ours = FocalRetinaNet(vcfg)
        if state is None:
            state = ours.state_dict()
        else:
            ours.load_state_dict(state, strict=True)
        precision = variant.partition("-")[0]
        runners.append(Runner(f"ours {variant}", ours, vcfg, _DTYPES[precision]))
    return runners


def make_inputs(size: Tuple[int, int], batch: int, num_classes: int, seed: int = 0) -> List[Dict]:
    g = torch.Generator().manual_seed(seed)
    h, w = size
    inputs = []
    for _ in range(batch):
        image = torch.rand(3, h, w, generator=g) * 255
        xy = torch.rand(5, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 32 + torch.rand(5, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (5,), generator=g)
        inputs.append({"image": image, "instances": inst})
    return inputs


@torch.no_grad()
def head_outputs(model, inputs):
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    return images, features, model.head(features)


def count_candidates(logits: List[torch.Tensor], thresh: float) -> float:
    logit_thresh = math.log(thresh / (1 - thresh))
    return sum((x > logit_thresh).sum().item() for x in logits) / logits[0].shape[0]


@torch.no_grad()
def calibrate_trained_scores(models, inputs, target: int, thresh: float) -> None:
    """Shift the classification bias of all models so ~``target`` scores per image pass."""
    _, _, (logits, _) = head_outputs(models[0], inputs)
    flat = torch.cat([x.flatten(1) for x in logits], dim=1)  # (N, all scores)
    k = min(target, flat.shape[1])
    kth = flat.topk(k, dim=1).values[:, -1].mean().item()
    shift = math.log(thresh / (1 - thresh)) - kth + 1e-4
    for model in models:
        model.head.cls_score.bias.add_(shift)


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_runs(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int,
              device: str) -> Dict[str, List[float]]:
    """Seconds of each run of each function; one run of each per repeat, the order reversed
    every other repeat."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


class _RepeatInputs:
    """A data loader that yields fresh copies of the same batch forever."""

    def __init__(self, inputs: List[Dict]):
        self.inputs = inputs

    def __iter__(self) -> Iterator[List[Dict]]:
        while True:
            yield [dict(x) for x in self.inputs]


def train_step(runner: Runner, inputs):
    """``train_net.py``'s step: the trainer ``SOLVER.AMP`` selects, detectron2's optimizer."""
    cfg = runner.cfg
    dtype = training_dtype(cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.PRECISION, cfg.MODEL.DEVICE,
                           "SOLVER.AMP.PRECISION")
    trainer = build_step_trainer(runner.model, _RepeatInputs(inputs),
                                 build_optimizer(cfg, runner.model), dtype, cfg.MODEL.DEVICE)

    def run():
        runner.model.train()
        with EventStorage():
            trainer.run_step()
    return run


def loss_path(model, images, features, predictions, gt_instances):
    def run():
        model.train()
        leaves = [[x.detach().requires_grad_() for x in level] for level in predictions]
        with EventStorage():
            losses = model.forward_training(images, features, leaves, gt_instances)
            sum(losses.values()).backward()
    return run


def inference(model, inputs):
    images = [{"image": x["image"]} for x in inputs]

    def run():
        model.eval()
        with torch.no_grad():
            model(images)
    return run


def post_processing(model, images, features, predictions):
    def run():
        model.eval()
        with torch.no_grad():
            model.forward_inference(images, features, predictions)
    return run


class _DenseForward(nn.Module):
    """Backbone and head on a padded batch: where a RetinaNet's FLOPs are."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        features = self.model.backbone(x)
        return self.model.head([features[f] for f in self.model.head_in_features])


def forward_flops(model, inputs) -> float:
    """FLOPs of one inference forward (backbone + head) of the batch: 2 x fvcore's count of
    multiply-adds."""
    from fvcore.nn import FlopCountAnalysis

    model.eval()
    with torch.no_grad():
        x = model.preprocess_image([{"image": i["image"]} for i in inputs]).tensor
        count = FlopCountAnalysis(_DenseForward(model), (x,))
        count.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return 2.0 * count.total()


_LIMIT = "matmul limit "  # prefix of the limit's timed functions


def matmul_limit_fns(dtypes, device: str) -> Tuple[Dict[str, Callable[[], None]], float]:
    """One n x n x n matmul per dtype, timed among a row's runs so that it sees the same load;
    on CUDA float32 with the TF32 setting the convolutions use. Returns (functions, FLOPs)."""
    n = 8192 if torch.device(device).type == "cuda" else 2048
    g = torch.Generator().manual_seed(0)
    fns = {}
    for dtype in sorted(set(dtypes), key=str):
        a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in "ab")

        def run(a=a, b=b):
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
            try:
                torch.matmul(a, b)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32
        fns[_LIMIT + str(dtype).replace("torch.", "")] = run
    return fns, 2.0 * n ** 3


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


@dataclass
class Row:
    model: str
    size: str
    batch: int
    regime: str
    stage: str
    candidates: float
    times: Dict[str, List[float]]  # runner name -> seconds of each run
    gflop: Optional[float] = None  # the stage's work, GFLOP (train and infer)
    limits: Optional[Dict[str, float]] = None  # dtype name -> matmul GFLOP/s during the runs


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = loadavg()
    dtypes = [torch.float32] + [_DTYPES[v.partition("-")[0]] for v in args.variants]
    limit_fns, limit_flop = ({}, 0.0) if args.no_flops else matmul_limit_fns(dtypes, args.device)
    rows: List[Row] = []
    for model_name in args.models:
        runners = build_runners(model_name, args.variants, args.depth, args.device)
        # theirs: the reference (detectron2's, or ours fp32 where detectron2 cannot build it)
        theirs, ours = runners[0].model, runners[1].model if len(runners) > 1 else None
        has_detectron2 = runners[0].name.startswith("detectron2")
        ours = ours if has_detectron2 else theirs
        models = [r.model for r in runners]
        if model_name == "demo":
            cfg = runners[0].cfg
            sizes = [f"{cfg.INPUT.MIN_SIZE_TEST}x{cfg.INPUT.MAX_SIZE_TEST}"]
        else:
            sizes = args.sizes
        # The prior bias (Sec. 3.3) of the freshly built head; "trained" shifts it per row.
        prior_bias = theirs.head.cls_score.bias.detach().clone()
        for size_str in sizes:
            size = tuple(int(v) for v in size_str.lower().split("x"))
            for batch in args.batch_sizes:
                inputs = make_inputs(size, batch, theirs.num_classes)
                gflop = None if args.no_flops else forward_flops(theirs, inputs) / 1e9
                for regime in args.scores:
                    with torch.no_grad():
                        for m in models:
                            m.head.cls_score.bias.copy_(prior_bias)
                    if regime == "trained":
                        calibrate_trained_scores(models, inputs, args.candidates,
                                                 theirs.test_score_thresh)
                    images, features, predictions = head_outputs(ours, inputs)
                    candidates = count_candidates(predictions[0], theirs.test_score_thresh)
                    for stage in args.stages:
                        if stage in ("loss", "post") and not has_detectron2:
                            continue
                        row = Row(model_name, size_str, batch, regime, stage, candidates, {})
                        if stage == "train":
                            fns = {r.name: train_step(r, inputs) for r in runners}
                            repeats, row.gflop = args.repeats, gflop and 3 * gflop
                        elif stage == "loss":
                            gt = [x["instances"].to(ours.device) for x in inputs]
                            fns = {r.name: loss_path(r.model, images, features, predictions, gt)
                                   for r in runners[:2]}
                            repeats = args.post_repeats
                        elif stage == "infer":
                            fns = {r.name: inference(r.model, inputs) for r in runners}
                            repeats, row.gflop = args.repeats, gflop
                        else:
                            fns = {r.name: post_processing(r.model, images, features,
                                                           predictions)
                                   for r in runners[:2]}
                            repeats = args.post_repeats
                        if row.gflop:
                            fns.update(limit_fns)
                        times = time_runs(fns, repeats, args.warmup, args.device)
                        row.times = {k: v for k, v in times.items() if not k.startswith(_LIMIT)}
                        row.limits = {k[len(_LIMIT):]: limit_flop / statistics.median(v) / 1e9
                                      for k, v in times.items() if k.startswith(_LIMIT)}
                        rows.append(row)
                        print_row(row, runners, header=len(rows) == 1)
    print_loss_shares(rows)
    print()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
          f"median (min - max) of {args.repeats} (post, loss: {args.post_repeats}) runs after "
          f"{args.warmup} warm-up; speedup = detectron2 / ours (where detectron2 cannot build the "
          f"model: ours fp32 / this); training step = 3 x forward "
          f"FLOPs; load average {load_start} at the start, {loadavg()} at the end")


def print_loss_shares(rows: List[Row]) -> None:
    """The loss stage's time as a share of the training step's, per model and measurement."""
    steps = {(r.model, r.size, r.batch, r.regime): r for r in rows if r.stage == "train"}
    losses = [r for r in rows if r.stage == "loss" and (r.model, r.size, r.batch, r.regime)
              in steps]
    if losses:
        print("\nthe losses' share of a training step (loss stage / train stage):")
    for row in losses:
        step = steps[(row.model, row.size, row.batch, row.regime)]
        parts = []
        for name in row.times:
            loss_s, step_s = (statistics.median(x.times[name]) for x in (row, step))
            parts.append(f"{name.split()[0]} {loss_s / step_s:6.1%} ({loss_s * 1e3:.0f} of "
                         f"{step_s * 1e3:.0f} ms)")
        print(f"{row.model:>5} {row.size:>9} batch {row.batch} {row.regime:>8}: "
              + ", ".join(parts))


def print_row(row: Row, runners: List[Runner], header: bool) -> None:
    """One line per runner: median, spread, speedup over detectron2, fraction of the limit."""
    if header:
        print(f"{'model':>5} {'size':>9} {'batch':>5} {'scores':>8} {'stage':>6} "
              f"{'cand/img':>9} {'runner':<16} {'median ms':>10} {'min - max ms':>19} "
              f"{'speedup':>8} {'GFLOP':>7} {'GFLOP/s':>8} {'of limit':>9}")
    dtypes = {r.name: str(r.dtype).replace("torch.", "") for r in runners}
    reference = statistics.median(next(iter(row.times.values())))
    for name, times in row.times.items():
        median = statistics.median(times)
        line = (f"{row.model:>5} {row.size:>9} {row.batch:>5} {row.regime:>8} {row.stage:>6} "
                f"{row.candidates:>9.0f} {name:<16} {median * 1e3:>10.1f} "
                f"{min(times) * 1e3:>8.1f} - {max(times) * 1e3:>8.1f} "
                f"{reference / median:>7.2f}x")
        if row.gflop and row.limits:
            rate = row.gflop / median
            line += (f" {row.gflop:>7.1f} {rate:>8.1f} {rate / row.limits[dtypes[name]]:>8.1%} "
                     f"{dtypes[name]}")
        print(line, flush=True)
    if row.limits:
        print(" " * 50 + "matmul limit during these runs (GFLOP/s, median): " + ", ".join(
            f"{dtype} {gflops:.1f}" for dtype, gflops in row.limits.items()), flush=True)


if __name__ == "__main__":
    main()
