"""FocalRetinaNet against detectron2's RetinaNet, same weights, timed side by side in one run.

For each image size, batch size and score regime it times
  * train: one training step (forward + backward, inside an EventStorage),
  * infer: whole inference (``model(inputs)`` under ``torch.no_grad``),
  * post:  post-processing alone (``forward_inference`` on precomputed head outputs),
  * loss:  the training losses alone, from the head's outputs to their gradient
    (``forward_training``: anchor matching, classification and box losses, and backward onto
    the head's outputs),
and prints the median times and the speedup (detectron2's time / ours; > 1 means ours is faster).
With both "train" and "loss", it also prints the loss's share of each model's training step.

Score regimes:
  * random: the head as initialised (prior bias, Sec. 3.3) on a randomly initialised backbone;
  * trained: the classification bias shifted so that about ``--candidates`` scores per image
    pass the 0.05 threshold, like a trained detector.
The "cand/img" column gives the measured number of scores above the threshold per image.

Ours and detectron2's runs alternate within each repeat, so a change in machine load hits both.

Example (quick):  python benchmarks/retinanet.py --sizes 512x512 --batch-sizes 1 --repeats 2
Full:             python benchmarks/retinanet.py
"""

import argparse
import math
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from retinanet_plugin import FocalRetinaNet, add_retinanet_plugin_config
from retinanet_plugin.config import load_config_file


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["512x512", "800x1333"],
                        help="image sizes HxW")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--stages", nargs="+", default=["train", "loss", "infer", "post"],
                        choices=["train", "loss", "infer", "post"])
    parser.add_argument("--scores", nargs="+", default=["random", "trained"],
                        choices=["random", "trained"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--post-repeats", type=int, default=10,
                        help="timed runs of the (fast) post-processing stage")
    parser.add_argument("--depth", type=int, default=50, help="ResNet depth (50 = R50-FPN)")
    parser.add_argument("--candidates", type=int, default=2000,
                        help="scores above the threshold per image in the 'trained' regime")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def build_models(depth: int, device: str) -> Tuple[RetinaNet, FocalRetinaNet]:
    cfg = get_cfg()
    add_retinanet_plugin_config(cfg)
    load_config_file(cfg, model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    cfg.MODEL.RESNETS.DEPTH = depth
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    torch.manual_seed(0)
    theirs = RetinaNet(cfg)
    ours = FocalRetinaNet(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def make_inputs(size: Tuple[int, int], batch: int, seed: int = 0) -> List[Dict]:
    g = torch.Generator().manual_seed(seed)
    h, w = size
    inputs = []
    for _ in range(batch):
        image = torch.rand(3, h, w, generator=g) * 255
        xy = torch.rand(5, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 32 + torch.rand(5, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 80, (5,), generator=g)
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
    """Shift the classification bias of both models so ~``target`` scores per image pass."""
    _, _, (logits, _) = head_outputs(models[0], inputs)
    flat = torch.cat([x.flatten(1) for x in logits], dim=1)  # (N, all scores)
    k = min(target, flat.shape[1])
    kth = flat.topk(k, dim=1).values[:, -1].mean().item()
    shift = math.log(thresh / (1 - thresh)) - kth + 1e-4
    for model in models:
        model.head.cls_score.bias.add_(shift)


def time_pair(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int) -> Dict[str, float]:
    """Median seconds of each function, runs of the two alternating (order flipped each time)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(model, inputs):
    def run():
        model.train()
        model.zero_grad(set_to_none=True)
        with EventStorage():
            losses = model([dict(x) for x in inputs])
            sum(losses.values()).backward()
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


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    theirs, ours = build_models(args.depth, args.device)
    # The prior bias (Sec. 3.3) of the freshly built head; "trained" shifts it per measurement.
    prior_bias = theirs.head.cls_score.bias.detach().clone()
    rows = []
    for size_str in args.sizes:
        size = tuple(int(v) for v in size_str.lower().split("x"))
        for batch in args.batch_sizes:
            inputs = make_inputs(size, batch)
            for regime in args.scores:
                with torch.no_grad():
                    for m in (theirs, ours):
                        m.head.cls_score.bias.copy_(prior_bias)
                if regime == "trained":
                    calibrate_trained_scores((theirs, ours), inputs, args.candidates,
                                             theirs.test_score_thresh)
                images, features, predictions = head_outputs(ours, inputs)
                candidates = count_candidates(predictions[0], theirs.test_score_thresh)
                for stage in args.stages:
                    if stage == "train":
                        fns = {"theirs": train_step(theirs, inputs),
                               "ours": train_step(ours, inputs)}
                        repeats = args.repeats
                    elif stage == "loss":
                        gt = [x["instances"].to(ours.device) for x in inputs]
                        fns = {name: loss_path(m, images, features, predictions, gt)
                               for name, m in (("theirs", theirs), ("ours", ours))}
                        repeats = args.post_repeats
                    elif stage == "infer":
                        fns = {"theirs": inference(theirs, inputs), "ours": inference(ours, inputs)}
                        repeats = args.repeats
                    else:
                        fns = {
                            "theirs": post_processing(theirs, images, features, predictions),
                            "ours": post_processing(ours, images, features, predictions),
                        }
                        repeats = args.post_repeats
                    t = time_pair(fns, repeats, args.warmup)
                    rows.append(
                        (size_str, batch, regime, stage, candidates, t["theirs"], t["ours"])
                    )
                    print_row(rows[-1], header=len(rows) == 1)
    print_loss_shares(rows)
    print()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"R{args.depth}-FPN; median of {args.repeats} (post, loss: {args.post_repeats}) runs "
          f"after {args.warmup} warm-up; speedup = detectron2 / ours")


def print_loss_shares(rows) -> None:
    """The loss stage's time as a share of the training step's, per model and measurement."""
    steps = {row[:3]: row for row in rows if row[3] == "train"}
    losses = [row for row in rows if row[3] == "loss" and row[:3] in steps]
    if losses:
        print("\nthe losses' share of a training step (loss stage / train stage):")
    for row in losses:
        step = steps[row[:3]]
        print(f"{row[0]:>9} batch {row[1]} {row[2]:>8}: detectron2 {row[5] / step[5]:6.1%} "
              f"({row[5] * 1e3:.0f} of {step[5] * 1e3:.0f} ms), ours {row[6] / step[6]:6.1%} "
              f"({row[6] * 1e3:.0f} of {step[6] * 1e3:.0f} ms)")


def print_row(row, header: bool) -> None:
    if header:
        print(f"{'size':>9} {'batch':>5} {'scores':>8} {'stage':>6} {'cand/img':>9} "
              f"{'detectron2 ms':>14} {'ours ms':>10} {'speedup':>8}")
    size, batch, regime, stage, candidates, theirs_s, ours_s = row
    print(f"{size:>9} {batch:>5} {regime:>8} {stage:>6} {candidates:>9.0f} "
          f"{theirs_s * 1e3:>14.1f} {ours_s * 1e3:>10.1f} {theirs_s / ours_s:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
