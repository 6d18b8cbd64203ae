"""Every Python (lazy) config under configs/: it builds, trains one step, and describes the same
model, data, solver and run as its YAML twin.

Training steps run on small synthetic COCO files written in a temporary folder (64 px images,
two per batch), with random weights on CPU: nothing is downloaded.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import SimpleTrainer, hooks
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from detectron2.utils.registry import locate

from retinanet_plugin import FocalRetinaNet, FocalRPN
from retinanet_plugin.config import load_config
from retinanet_plugin.data import CocoCheckError, build_dataset_mapper, check_datasets
from retinanet_plugin.lazy import (
    clipped_optimizer,
    coco_instances,
    dataset_config,
    register_datasets,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.py"))
NAMES = [p.name for p in CONFIGS]


@pytest.fixture(autouse=True)
def eager_focal_loss(monkeypatch):
    # These tests are about configs, not the fused loss: skip its one-off torch.compile.
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")


def _write_coco(folder: Path, num_categories: int) -> Path:
    """Three 64x80 images with one to two boxes of category id 1 (contiguous class 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(3):
        name = f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / name)
        images.append({"id": i + 1, "file_name": name, "height": 64, "width": 80})
        for j in range(1 + i % 2):
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                "bbox": [5.0 + 20 * j, 8.0, 30.0, 24.0], "area": 720.0, "iscrowd": 0,
            })
    categories = [{"id": k + 1, "name": f"c{k}"} for k in range(num_categories)]
    path = folder / "instances.json"
    path.write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}
    ))
    return path


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    """[name, json_file, image_root] of a 3-category dataset, as coco_instances returns."""
    folder = tmp_path_factory.mktemp("lazy_coco")
    return ["lazy_test_coco", str(_write_coco(folder, 3)), str(folder)]


def _load(name: str):
    cfg = LazyConfig.load(str(CONFIG_DIR / name))
    bottom_up = cfg.model.backbone.bottom_up
    if "features" in bottom_up:  # MobileNetV2: no ImageNet weights in a unit test
        bottom_up.features.pretrained = False
    return cfg


def _tiny(cfg, coco_files):
    """Trains on the synthetic set: 64 px (56-72 where the size is a range), 2 images a batch."""
    cfg.dataloader.coco_instances = [coco_files]
    cfg.dataloader.train.dataset.names = coco_files[0]
    cfg.dataloader.test.dataset.names = coco_files[0]
    register_datasets(cfg.dataloader)
    for mapper in (cfg.dataloader.train.mapper, cfg.dataloader.test.mapper):
        for aug in mapper.augmentations:
            if "short_edge_length" in aug:
                ranged = aug.get("sample_style") == "range"
                aug.short_edge_length = (56, 72) if ranged else 64
                aug.max_size = 96
    cfg.dataloader.train.total_batch_size = 2
    cfg.dataloader.train.num_workers = 0
    cfg.train.device = "cpu"
    return cfg


@pytest.mark.parametrize("name", NAMES)
def test_config_trains_one_step_and_evaluates(name, coco_files):
    """instantiate(model / optimizer / dataloader.train / lr_multiplier), as detectron2's
    tools/lazyconfig_train_net.py does; the config's own test loader and evaluator
    (COCOEvaluator) over the test set; and one SimpleTrainer step."""
    cfg = _tiny(_load(name), coco_files)
    # The synthetic set's 3 categories (COCOEvaluator refuses a class beyond them).
    if "num_classes" in cfg.model:
        cfg.model.num_classes = 3
    else:
        cfg.model.roi_heads.num_classes = 3
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(cfg.train.device)
    # Random weights with frozen (identity) batch norm: each bottleneck adds its branch to the
    # residual stream, which grows ~2x a block and overflows in a 101-layer trunk. Shrinking each
    # block's last convolution (as trained weights are) keeps the outputs finite.
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "conv3") and hasattr(module.conv3, "weight"):
                module.conv3.weight.mul_(0.1)
    # Evaluation as lazyconfig_train_net.py's do_test runs it, before the step (one SGD step of a
    # random deep trunk can make its outputs non-finite). Random weights score nothing worth a
    # threshold: keep every candidate, so the evaluator has detections to score.
    if isinstance(model, FocalRetinaNet):
        model.test_score_thresh = 0.0
    else:
        model.roi_heads.box_predictor.test_score_thresh = 0.0
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    # 3 images, 5 boxes of one category: COCO's AP table, every value a number in [0, 100].
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75"}
    assert all(0 <= results["bbox"][k] <= 100 for k in ("AP", "AP50", "AP75")), results
    model.train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    trainer = SimpleTrainer(model, instantiate(cfg.dataloader.train), optimizer)
    trainer.register_hooks([hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier))])
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train(0, 1)

    latest = trainer.storage.latest()
    expected = {"loss_cls", "loss_box_reg"}
    if isinstance(model, FocalRetinaNet):
        assert type(model.head).__name__ == "FocalRetinaNetHead"
    else:
        assert isinstance(model.proposal_generator, FocalRPN)
        expected |= {"loss_rpn_cls", "loss_rpn_loc"}
    assert expected <= latest.keys()
    assert np.isfinite(latest["total_loss"][0]) and latest["total_loss"][0] > 0
    # The step moved the head (its gradient is never zero: every anchor has a loss).
    head = "head." if isinstance(model, FocalRetinaNet) else "proposal_generator.rpn_head."
    moved = [n for n, p in model.named_parameters() if n in trained and n.startswith(head)
             and not torch.equal(p, trained[n])]
    assert moved


# --------------------------------------------------------------------------------------------
# The same run as the YAML twin
# --------------------------------------------------------------------------------------------
def _yaml(name: str):
    cfg = load_config(str(CONFIG_DIR / name.replace(".py", ".yaml")))
    cfg.MODEL.MOBILENET.PRETRAINED = False
    return cfg


def _batch():
    g = torch.Generator().manual_seed(3)
    inputs = []
    images = ((96, 128, [[10, 12, 60, 70], [50, 20, 120, 90]]), (128, 96, [[5, 5, 90, 60]]))
    for h, w, boxes in images:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.zeros(len(boxes), dtype=torch.int64)
        inputs.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst})
    return inputs


def _losses(model):
    model.train()
    torch.manual_seed(0)  # the ROI heads sample proposals at random
    with EventStorage(), torch.no_grad():
        return {k: v.item() for k, v in model(_batch()).items()}


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_the_model_of_its_yaml_twin(name):
    """Same parameters (names, shapes, which are trained), and with the YAML model's weights the
    same losses (anchors, matching, pixel statistics, loss and normaliser) and test-time keys."""
    ycfg, cfg = _yaml(name), _load(name)
    device = ycfg.MODEL.DEVICE
    ycfg.MODEL.DEVICE = "cpu"
    theirs = build_model(ycfg)
    ours = instantiate(cfg.model)
    assert cfg.train.device == device
    assert type(ours) is type(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == trainable
    ours.load_state_dict(theirs.state_dict())
    for buffer in ("pixel_mean", "pixel_std"):
        assert torch.equal(getattr(ours, buffer), getattr(theirs, buffer)), buffer
    assert ours.input_format == theirs.input_format == ycfg.INPUT.FORMAT
    if isinstance(ours, FocalRetinaNet):
        assert ours.postprocessing == theirs.postprocessing
        assert repr(ours.loss_normalizer) == repr(theirs.loss_normalizer)
        assert type(ours.cls_loss) is type(theirs.cls_loss)
        assert vars(ours.cls_loss) == vars(theirs.cls_loss)
        for key in ("box_reg_loss_type", "smooth_l1_beta", "crowd_ioa_thresh",
                    "channels_last", "test_amp_precision"):
            assert getattr(ours, key) == getattr(theirs, key), key
    else:
        ours_rpn, theirs_rpn = ours.proposal_generator, theirs.proposal_generator
        for key in ("pre_nms_topk", "post_nms_topk", "nms_thresh", "min_box_size",
                    "loss_weight", "smooth_l1_beta", "box_reg_loss_type"):
            assert getattr(ours_rpn, key) == getattr(theirs_rpn, key), key
        assert vars(ours_rpn.cls_loss) == vars(theirs_rpn.cls_loss)
    ours_losses, theirs_losses = _losses(ours), _losses(theirs)
    assert ours_losses == theirs_losses and all(v > 0 for v in theirs_losses.values())


def _describe(augmentations):
    """What each augmentation does: a resize by the sizes it can draw (detectron2's lazy test
    resize draws from the range [800, 800], the YAML one chooses from (800,): the same), others
    by their repr."""
    described = []
    for aug in augmentations.augs:
        if isinstance(aug, T.ResizeShortestEdge):
            low, high = aug.short_edge_length[0], aug.short_edge_length[-1]
            sizes = range(low, high + 1) if aug.is_range else aug.short_edge_length
            described.append(("resize", tuple(sorted(set(sizes))), aug.max_size))
        elif " object at " in repr(aug):  # no parameters to show
            described.append(type(aug).__name__)
        else:
            described.append(repr(aug))
    return described


@pytest.mark.parametrize("name", NAMES)
def test_config_holds_the_data_solver_and_run_of_its_yaml_twin(name):
    ycfg, cfg = _yaml(name), _load(name)
    loader = cfg.dataloader
    # Data: the plugin's mapper with the same augmentations, the same datasets and batch.
    for is_train, node in ((True, loader.train.mapper), (False, loader.test.mapper)):
        ours, theirs = instantiate(node), build_dataset_mapper(ycfg, is_train=is_train)
        assert type(ours) is type(theirs)
        assert _describe(ours.augmentations) == _describe(theirs.augmentations), is_train
        for key in ("image_format", "use_instance_mask", "recompute_boxes", "skip_unreadable",
                    "keep_crowd"):
            assert getattr(ours, key) == getattr(theirs, key), (is_train, key)
    datasets = dataset_config(loader, cfg.model)
    for key in ("TRAIN", "TEST", "COCO_INSTANCES"):
        assert list(datasets.DATASETS[key]) == list(ycfg.DATASETS[key]), key
    assert loader.get("check", "header") == ycfg.DATASETS.CHECK
    filter_empty = loader.train.dataset.get("filter_empty", True)
    assert filter_empty == ycfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    assert loader.train.total_batch_size == ycfg.SOLVER.IMS_PER_BATCH
    assert loader.train.num_workers == ycfg.DATALOADER.NUM_WORKERS

    # Solver: SGD settings, gradient clipping, and the learning rate at every milestone.
    model = torch.nn.Linear(1, 1)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (
        ycfg.SOLVER.BASE_LR, ycfg.SOLVER.MOMENTUM, ycfg.SOLVER.WEIGHT_DECAY
    )
    clip = ycfg.SOLVER.CLIP_GRADIENTS
    assert (cfg.optimizer._target_ is clipped_optimizer) == clip.ENABLED
    if clip.ENABLED:
        assert (cfg.optimizer.clip_type, cfg.optimizer.clip_value) == (
            clip.CLIP_TYPE, clip.CLIP_VALUE
        )
    max_iter = ycfg.SOLVER.MAX_ITER
    assert cfg.train.max_iter == max_iter
    theirs = build_lr_scheduler(ycfg, torch.optim.SGD(model.parameters(), lr=1.0))._multiplier
    ours = instantiate(cfg.lr_multiplier)
    edges = [0, ycfg.SOLVER.WARMUP_ITERS // 2, ycfg.SOLVER.WARMUP_ITERS, max_iter - 1]
    edges += [s + d for s in ycfg.SOLVER.STEPS for d in (-1, 0)]
    for it in edges:
        assert ours(it / max_iter) == pytest.approx(theirs(it / max_iter), rel=1e-12), it

    # Mixed precision: train.amp as SOLVER.AMP (the plugin's precision key defaults to "auto").
    amp = cfg.train.get("amp", {})
    assert (amp.get("enabled", False), amp.get("precision", "auto")) == (
        ycfg.SOLVER.AMP.ENABLED, ycfg.SOLVER.AMP.PRECISION
    )

    # Run: weights, checkpoints, seed, output folder.
    assert cfg.train.init_checkpoint == ycfg.MODEL.WEIGHTS
    assert cfg.train.checkpointer.period == ycfg.SOLVER.CHECKPOINT_PERIOD
    assert cfg.train.get("seed", -1) == ycfg.SEED
    assert cfg.train.output_dir == ycfg.OUTPUT_DIR


def test_every_yaml_config_at_the_top_level_has_a_lazy_twin():
    yamls = {p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("Base-")}
    assert yamls == {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_config_imports_the_plugin_and_detectron2s_common_pieces(path):
    text = path.read_text()
    assert "sys.path" not in text
    assert "import retinanet_plugin" in text or "from retinanet_plugin" in text or "from ." in text
    # Built on detectron2's configs/common through model_zoo, directly or through a sibling.
    assert "model_zoo.get_config(" in text or "from ." in text


# --------------------------------------------------------------------------------------------
# Datasets named by path
# --------------------------------------------------------------------------------------------
def test_coco_instances_resolves_against_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZY_DATA", "/data")
    config = str(tmp_path / "configs" / "mine.py")
    entries = coco_instances(
        [["a", "../d/train.json", "imgs"], ["b", "/abs/val.json", "$LAZY_DATA/img"]],
        relative_to=config,
    )
    assert entries == [
        ["a", str(tmp_path / "d" / "train.json"), str(tmp_path / "configs" / "imgs")],
        ["b", "/abs/val.json", "/data/img"],
    ]


def test_custom_example_registers_its_datasets_on_load():
    cfg = LazyConfig.load(str(CONFIG_DIR / "custom_coco_example.py"))
    for name, json_file, image_root in cfg.dataloader.coco_instances:
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert (meta.json_file, meta.image_root) == (json_file, image_root)
        assert json_file.startswith(str(REPO / "datasets" / "my_coco"))
    assert cfg.dataloader.train.dataset.names == "my_coco_train"
    assert cfg.dataloader.evaluator.dataset_name == "my_coco_val"


def test_datasets_are_checked_with_the_models_class_count(coco_files, tmp_path):
    cfg = _tiny(_load("custom_coco_example.py"), coco_files)
    check_datasets(dataset_config(cfg.dataloader, cfg.model))  # 3 categories, 3 classes
    cfg.model.num_classes = 1
    with pytest.raises(CocoCheckError, match="num_classes|NUM_CLASSES"):
        check_datasets(dataset_config(cfg.dataloader, cfg.model))
    # A missing image is found before training, as with DATASETS.CHECK "header".
    broken = tmp_path / "broken"
    json_file = _write_coco(broken, 3)
    (broken / "1.png").unlink()
    cfg.dataloader.coco_instances = [["lazy_test_broken", str(json_file), str(broken)]]
    cfg.dataloader.train.dataset.names = "lazy_test_broken"
    register_datasets(cfg.dataloader)
    cfg.model.num_classes = 3
    with pytest.raises(CocoCheckError, match="1.png"):
        check_datasets(dataset_config(cfg.dataloader, cfg.model))


class TreeDetector(FocalRetinaNet):
    """A user's FocalRetinaNet subclass, whose name does not say RetinaNet."""


def _focal_retinanet(**kwargs):
    """A factory function as ``_target_``: no class to ask."""
    return FocalRetinaNet(**kwargs)


@pytest.mark.parametrize("target", [TreeDetector, f"{__name__}.TreeDetector", _focal_retinanet],
                         ids=["class", "dotted-name", "function"])
def test_a_one_stage_model_is_known_by_its_class_not_its_name(coco_files, target):
    """A RetinaNet subclass named otherwise still has its class count checked (and read by
    predict as MODEL.RETINANET.NUM_CLASSES); a factory function: by its num_classes."""
    cfg = _tiny(_load("custom_coco_example.py"), coco_files)
    cfg.model._target_ = target
    view = dataset_config(cfg.dataloader, cfg.model)
    assert view.MODEL.RETINANET.NUM_CLASSES == 3
    if not callable(target) or isinstance(target, type):
        assert view.MODEL.META_ARCHITECTURE == "FocalRetinaNet"
    check_datasets(view)
    cfg.model.num_classes = 1
    with pytest.raises(CocoCheckError, match="num_classes|NUM_CLASSES"):
        check_datasets(dataset_config(cfg.dataloader, cfg.model))


def test_register_datasets_refuses_a_builtin_name():
    loader = {"coco_instances": [["coco_2017_train", "/x.json", "/x"]]}
    with pytest.raises(ValueError, match="already registered"):
        register_datasets(loader)


# --------------------------------------------------------------------------------------------
# Saving: detectron2's training script writes config.yaml of every lazy run
# --------------------------------------------------------------------------------------------
def test_saved_config_loads_back_to_the_same_model(tmp_path):
    cfg = _load("demo_deepforest_mobilenet_v2_fpn_long.py")
    path = str(tmp_path / "config.yaml")
    LazyConfig.save(cfg, path)
    loaded = LazyConfig.load(path)
    # Classes and functions are saved by name.
    assert locate(loaded.model._target_) is FocalRetinaNet
    assert locate(loaded.optimizer._target_) is clipped_optimizer
    torch.manual_seed(0)
    a = instantiate(cfg.model)
    torch.manual_seed(0)
    b = instantiate(loaded.model)
    assert a.postprocessing == b.postprocessing
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_clipped_optimizer_clips_as_the_yaml_solver_does():
    weight = torch.nn.Parameter(torch.zeros(4))
    optimizer = clipped_optimizer("torch.optim.SGD", params=[weight], lr=1.0,
                                  clip_type="norm", clip_value=0.5)
    weight.grad = torch.full((4,), 10.0)  # norm 20, clipped to 0.5
    optimizer.step()
    assert weight.detach().norm().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="clip_type"):
        clipped_optimizer(params=[weight], lr=1.0, clip_type="full_model", clip_value=1.0)
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        clipped_optimizer("torch.nn.Linear", params=[weight], lr=1.0, clip_type="norm",
                          clip_value=1.0)
