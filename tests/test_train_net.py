"""train_net.py end to end on a few DeepForest tiles: train, evaluate, resume, two CPU processes.

These train for real (a few iterations of the CPU demo model, random weights), so they take tens
of seconds; the data is the DeepForest sample converted by retinanet_plugin.data (fetched once).
"""

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import cv2
import pytest
import torch

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from detectron2.utils import comm

from retinanet_plugin.data.deepforest import prepare_deepforest
from retinanet_plugin.engine import launch

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.yaml"
TINY = "deepforest_tree_tiny_for_tests"
# Small and fast: random weights, 2 images per step, no loader workers.
FAST_OPTS = [
    "MODEL.MOBILENET.PRETRAINED", "False",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0",
    "SEED", "1",
]  # fmt: skip

pytestmark = pytest.mark.slow


def _load_train_net():
    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory):
    root = REPO / "datasets" / "deepforest"
    prepare_deepforest(root)
    # Four validation tiles that hold trees, as a dataset of their own.
    coco = json.loads((root / "val.json").read_text())
    with_boxes = sorted({a["image_id"] for a in coco["annotations"]})[:4]
    coco["images"] = [img for img in coco["images"] if img["id"] in with_boxes]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in with_boxes]
    tiny = tmp_path_factory.mktemp("tiny") / "tiny.json"
    tiny.write_text(json.dumps(coco))
    if TINY not in DatasetCatalog.list():
        register_coco_instances(TINY, {"thing_classes": ["Tree"]}, str(tiny), str(root / "images"))
    return REPO / "datasets"


def _args(output_dir, *opts, resume=False, eval_only=False):
    argv = ["--config-file", str(DEMO_CONFIG)]
    argv += ["--resume"] * resume + ["--eval-only"] * eval_only
    argv += FAST_OPTS + ["OUTPUT_DIR", str(output_dir)] + list(opts)
    return default_argument_parser().parse_args(argv)


def _metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]


def test_train_evaluate_resume(datasets_dir, tmp_path):
    train_net = _load_train_net()
    out = tmp_path / "run"
    data = ["DATASETS.TRAIN", f"('{TINY}',)", "DATASETS.TEST", f"('{TINY}',)"]
    # After 3 steps every score is still near the prior pi = 0.01 (Sec. 3.3), below the default
    # 0.05 threshold; keep them so that COCOEvaluator has detections to score.
    data += ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "100"]

    train_net.main(_args(out, "SOLVER.MAX_ITER", "3", *data))

    # The final evaluation ran COCOEvaluator and its AP reached metrics.json: numbers in
    # [0, 100]; APs / APm may be NaN (no box of that size), never missing.
    records = _metrics(out)
    bbox = records[-1]
    for key in ("AP", "AP50", "AP75"):
        assert 0.0 <= bbox[f"bbox/{key}"] <= 100.0, (key, bbox)
    for key in ("APs", "APm", "APl"):
        assert isinstance(bbox[f"bbox/{key}"], float), (key, bbox)
    assert any(r.get("iteration") == 2 and "total_loss" in r for r in records)
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    picture = cv2.imread(str(out / "val_predictions.png"))
    assert picture.shape == (800, 4 * 800, 3)  # 4 tiles of 400x400, enlarged 2x, in one row
    first = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert first["iteration"] == 2

    # --resume continues from the last checkpoint (iteration 3) up to the new MAX_ITER.
    train_net.main(_args(out, "SOLVER.MAX_ITER", "5", *data, resume=True))
    log = (out / "log.txt").read_text()
    assert "Starting training from iteration 3" in log
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)[
        "iteration"
    ] == 4

    # --eval-only loads MODEL.WEIGHTS and evaluates without training.
    again = train_net.main(
        _args(out, "MODEL.WEIGHTS", str(out / "model_final.pth"), *data, eval_only=True)
    )
    assert set(again["bbox"]) >= {"AP", "AP50", "AP75"}


def _stale_results(out):
    """An earlier run's detections on TINY in ``out``, as COCOEvaluator leaves them."""
    inference = out / "inference" / TINY
    inference.mkdir(parents=True)
    image_id = DatasetCatalog.get(TINY)[0]["image_id"]
    det = {"image_id": image_id, "category_id": 0, "bbox": [10, 10, 50, 50], "score": 0.9}
    path = inference / "coco_instances_results.json"
    path.write_text(json.dumps([det]))
    return path


def test_failed_training_does_not_draw_stale_results(datasets_dir, tmp_path, monkeypatch):
    train_net = _load_train_net()
    out = tmp_path / "run"
    stale = _stale_results(out)
    before = stale.stat().st_mtime_ns

    def failing_step(trainer):
        raise RuntimeError("injected failure in the first step")

    monkeypatch.setattr(train_net.Trainer, "run_step", failing_step)
    data = ["DATASETS.TRAIN", f"('{TINY}',)", "DATASETS.TEST", f"('{TINY}',)"]
    with pytest.raises(RuntimeError, match="injected failure"):
        train_net.main(_args(out, "SOLVER.MAX_ITER", "3", *data))
    # detectron2 ran the hooks' after_train in its `finally`, but nothing was drawn from the
    # earlier run's file, which is untouched.
    assert not (out / train_net.PREDICTIONS_PICTURE).exists()
    assert stale.stat().st_mtime_ns == before


def test_picture_only_from_results_written_by_this_run(datasets_dir, tmp_path):
    """A training that finished but whose evaluation did not rewrite the file draws nothing;
    once the file is rewritten, it is drawn."""
    train_net = _load_train_net()
    out = tmp_path / "run"
    stale = _stale_results(out)
    cfg = train_net.setup(_args(out, "DATASETS.TEST", f"('{TINY}',)"))
    trainer = SimpleNamespace(cfg=cfg, iter=3, max_iter=3)  # every step ran
    hook = train_net.PredictionsPicture()
    hook.trainer = trainer
    hook.before_train()
    hook.after_train()
    assert not (out / train_net.PREDICTIONS_PICTURE).exists()

    hook.before_train()
    stale.write_text(stale.read_text().replace("0.9", "0.8"))  # rewritten by "this run"
    os.utime(stale, ns=(stale.stat().st_atime_ns, stale.stat().st_mtime_ns + 10**9))
    trainer.iter = 2  # ... but a step failed: still nothing
    hook.after_train()
    assert not (out / train_net.PREDICTIONS_PICTURE).exists()
    trainer.iter = 3
    hook.after_train()
    assert cv2.imread(str(out / train_net.PREDICTIONS_PICTURE)).shape == (800, 4 * 800, 3)


def _train_and_dump(output_dir, dump_dir):
    """Runs in each spawned process: trains a few steps, saves this rank's parameters."""
    train_net = _load_train_net()
    args = _args(
        output_dir, "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "100"
    )
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    initial = {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}
    trainer.train()
    params = {k: v.detach() for k, v in trainer.model.module.state_dict().items()}
    changed = sum(not torch.equal(initial[k], params[k]) for k in params)
    torch.save(
        {
            "params": params,
            "changed": changed,
            "world_size": comm.get_world_size(),
            "local_rank": comm.get_local_rank(),
            "backend": torch.distributed.get_backend(),
        },
        Path(dump_dir) / f"rank{comm.get_rank()}.pt",
    )


def _digest(params):
    h = hashlib.sha256()
    for key in sorted(params):
        h.update(key.encode())
        h.update(params[key].float().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_two_processes_on_cpu(datasets_dir, tmp_path, monkeypatch):
    # The demo config's MODEL.DEVICE is "cpu": GLOO workers, also on a machine with a GPU.
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets_dir))  # read by the spawned workers
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(_train_and_dump, 2, dist_url="auto", args=(tmp_path / "run", tmp_path), device="cpu")

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r, dump in enumerate(ranks):
        assert dump["world_size"] == 2 and dump["local_rank"] == r and dump["backend"] == "gloo"
        assert dump["changed"] > 0  # training moved the weights
    # DDP averaged the gradients: both replicas took the same steps from the same weights.
    assert _digest(ranks[0]["params"]) == _digest(ranks[1]["params"])


def test_eval_only_with_test_time_augmentation(datasets_dir, tmp_path):
    train_net = _load_train_net()
    out = tmp_path / "tta"
    opts = ["DATASETS.TEST", f"('{TINY}',)", "MODEL.WEIGHTS", ""]
    # Random weights score near the prior 0.01: a 0.0 threshold gives COCOEvaluator detections.
    opts += ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "100"]
    opts += ["MODEL.RETINANET.TOPK_CANDIDATES_TEST", "100"]  # a smaller NMS: a faster test
    opts += ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(320,)", "TEST.AUG.FLIP", "True"]
    res = train_net.main(_args(out, *opts, eval_only=True))
    # As detectron2's R-CNN train_net.py: the plain result and a separate "_TTA" one.
    assert set(res) == {"bbox", "bbox_TTA"}
    assert set(res["bbox_TTA"]) >= {"AP", "AP50", "AP75"}
    dets = json.loads((out / "inference_TTA" / TINY / "coco_instances_results.json").read_text())
    # 4 tiles, at most DETECTIONS_PER_IMAGE each (boxes left empty by the clipping are dropped).
    assert 4 * 90 < len(dets) <= 4 * 100
    # Mapped back from the 320-pixel version and its flip to the 400x400 tiles.
    for det in dets:
        x, y, w, h = det["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 400 + 1e-3 and y + h <= 400 + 1e-3


def test_crowd_ignore_train_loader_keeps_crowd_boxes(datasets_dir, tmp_path):
    train_net = _load_train_net()
    root = datasets_dir / "deepforest"
    coco = json.loads((root / "val.json").read_text())
    image_id = sorted({a["image_id"] for a in coco["annotations"]})[0]
    coco["images"] = [img for img in coco["images"] if img["id"] == image_id]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] == image_id]
    coco["annotations"][0]["iscrowd"] = 1  # one crown becomes a crowd region
    path = tmp_path / "crowd.json"
    path.write_text(json.dumps(coco))
    name = "deepforest_tree_crowd_for_tests"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {"thing_classes": ["Tree"]}, str(path), str(root / "images"))
    opts = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "INPUT.RANDOM_FLIP", "none"]
    cfg = train_net.setup(_args(tmp_path / "crowd", *opts, "MODEL.RETINANET.CROWD_IGNORE", "True"))
    instances = next(iter(train_net.Trainer.build_train_loader(cfg)))[0]["instances"]
    assert instances.gt_is_crowd.tolist() == [False] * (len(coco["annotations"]) - 1) + [True]
    # Off (the default), detectron2's loader drops the crowd region.
    cfg = train_net.setup(_args(tmp_path / "plain", *opts))
    instances = next(iter(train_net.Trainer.build_train_loader(cfg)))[0]["instances"]
    assert len(instances) == len(coco["annotations"]) - 1 and not instances.has("gt_is_crowd")
