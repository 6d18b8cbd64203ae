"""Mixed precision and channels-last (issue 20 parts 1-2): bfloat16 autocast training on CPU
through SOLVER.AMP (lazy: train.amp), bfloat16 inference through TEST.AMP (lazy:
model.test_amp_precision), MODEL.CHANNELS_LAST (lazy: model.channels_last), and the refusals.

The model tests use the small ResNet-18 detector of the predict tests; the end-to-end runs train
the CPU demo's model (random weights) for two steps on three synthetic 64x80 images.
"""

import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.engine import AMPTrainer, SimpleTrainer, default_argument_parser
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from retinanet_plugin import FocalRetinaNetWithTTA, RetinaNetCheckpointer
from retinanet_plugin.precision import AutocastTrainer, build_step_trainer, training_dtype

from detector_fixture import small_detector

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.yaml"
DEMO_PY = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.py"
# The head's cls_score conv runs once per level, P3-P7, in every call of the model.
LEVELS = 5


@pytest.fixture(autouse=True)
def eager_focal_loss(monkeypatch):
    # The eager focal loss: no one-off compile of the fused kernel in this process.
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")


@pytest.fixture(scope="module")
def detector():
    return small_detector()


def _image(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, 128, 160), generator=torch.Generator().manual_seed(seed))


def _detect(model, image):
    with torch.no_grad():
        return model([{"image": image.float()}])[0]["instances"]


def _dtypes_of(module):
    """Records (training, output dtype) of every call of ``module``; returns the list."""
    seen = []
    module.register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
    return seen


def _batch_formats(model):
    """Records whether each batch entering ``model.backbone`` is channels-last."""
    seen = []
    model.backbone.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    return seen


def _floating_dtypes(obj):
    """The dtypes of every floating-point tensor anywhere in a (nested) checkpoint."""
    if isinstance(obj, torch.Tensor):
        return {obj.dtype} if obj.is_floating_point() else set()
    if isinstance(obj, dict):
        return set().union(*map(_floating_dtypes, obj.values()))
    if isinstance(obj, (list, tuple)):
        return set().union(*map(_floating_dtypes, obj))
    return set()


# --------------------------------------------------------------------------------------------
# The model: bfloat16 training step and inference, channels-last
# --------------------------------------------------------------------------------------------
def test_bf16_training_steps_keep_float32_state(detector):
    cfg, _ = detector
    torch.manual_seed(0)
    model = build_model(cfg).train()
    conv_dtypes = _dtypes_of(model.head.cls_score)
    inst = Instances((128, 160))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 60.0, 90.0], [80.0, 30.0, 150.0, 120.0]]))
    inst.gt_classes = torch.tensor([1, 2])
    batch = [{"image": _image(1).float(), "instances": inst}]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]

    dtype = training_dtype(True, "auto", "cpu", "SOLVER.AMP.PRECISION")
    trainer = build_step_trainer(model, itertools.repeat(batch), optimizer, dtype, "cpu")
    assert dtype == torch.bfloat16 and type(trainer) is AutocastTrainer
    trainer.train(0, 2)

    # The head's convolutions ran in bfloat16 (autocast), in training mode, both steps.
    assert conv_dtypes == [(True, torch.bfloat16)] * (LEVELS * 2)
    for key in ("loss_cls", "loss_box_reg"):
        assert np.isfinite(trainer.storage.history(key).latest()), key
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.float32}
    assert {p.grad.dtype for p in params if p.grad is not None} == {torch.float32}
    momenta = [s["momentum_buffer"] for s in optimizer.state.values()]
    assert momenta and {m.dtype for m in momenta} == {torch.float32}
    assert any(not torch.equal(b, p) for b, p in zip(before, params))


def test_bf16_inference_is_close_to_float32(detector):
    cfg, model = detector
    conv_dtypes = _dtypes_of(model.head.cls_score)
    image = _image(0)
    ref = _detect(model, image)
    tta_cfg = cfg.clone()
    tta_cfg.TEST.AUG.MIN_SIZES = (128,)
    tta_cfg.TEST.AUG.FLIP = True  # two versions of the image, in one batch
    model.test_amp_precision = "bfloat16"
    try:
        bf16 = _detect(model, image)
        # Test-time augmentation runs the backbone and head itself, in the same precision.
        tta = _detect(FocalRetinaNetWithTTA(tta_cfg, model), image)
    finally:
        model.test_amp_precision = None
    assert conv_dtypes == [(False, torch.float32)] * LEVELS + [(False, torch.bfloat16)] * (
        LEVELS * 2
    )
    assert tta.scores.dtype == torch.float32 and tta.pred_boxes.tensor.dtype == torch.float32
    assert bf16.scores.dtype == torch.float32 and bf16.pred_boxes.tensor.dtype == torch.float32
    assert len(bf16) == len(ref) == 100
    # bfloat16 keeps 8 significant bits (a rounding errs by <= 2^-9 = 0.2 %): the head's logits
    # moved by at most 0.024 here (measured), and score = sigmoid(logit) by p (1 - p) times that,
    # about 0.05 * 0.95 * 0.024 = 0.0011 at these near-threshold scores (measured 0.0009).
    # 0.01 leaves room for other CPUs' oneDNN kernels; sorted, so swaps of near-equal scores
    # do not count.
    torch.testing.assert_close(bf16.scores, ref.scores, rtol=0, atol=0.01)
    # Box deltas moved by <= 0.013 (measured), i.e. up to ~1 % of an anchor's size per side: the
    # ten best detections each have a bfloat16 twin of their class with IoU >= 0.8 (measured
    # >= 0.88; NMS may keep a neighbouring candidate further down the list).
    top = ref[:10]
    iou = pairwise_iou(top.pred_boxes, bf16.pred_boxes)
    iou = iou * (top.pred_classes[:, None] == bf16.pred_classes[None]).float()
    assert iou.max(dim=1).values.min() >= 0.8


def test_channels_last_gives_the_same_detections_and_losses(detector):
    cfg, model = detector
    cl_cfg = cfg.clone()
    cl_cfg.MODEL.CHANNELS_LAST = True
    cl_model = build_model(cl_cfg).eval()
    cl_model.load_state_dict(model.state_dict())
    weight = cl_model.head.cls_score.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    batch_formats = _batch_formats(cl_model)

    image = _image(2)
    ref, out = _detect(model, image), _detect(cl_model, image)
    assert batch_formats == [True]
    assert len(out) == len(ref) == 100
    # The same sums in another order: float32 rounding only.
    torch.testing.assert_close(out.pred_classes, ref.pred_classes, rtol=0, atol=0)
    torch.testing.assert_close(out.scores, ref.scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.pred_boxes.tensor, ref.pred_boxes.tensor, rtol=0, atol=1e-3)

    # Training: the same losses (the fused focal loss reads the channels-last logits too).
    inst = Instances((128, 160))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 60.0, 90.0]]))
    inst.gt_classes = torch.tensor([0])
    batch = [{"image": image.float(), "instances": inst}]
    losses = []
    with EventStorage():
        for m in (model, cl_model):
            m.train()
            try:
                losses.append({k: v.item() for k, v in m(batch).items()})
            finally:
                m.eval()
    for key in losses[0]:
        assert losses[1][key] == pytest.approx(losses[0][key], rel=1e-4), key


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------
def test_float16_on_cpu_and_unknown_precisions_are_refused_by_key(detector):
    cfg, _ = detector
    with pytest.raises(ValueError, match=r"SOLVER\.AMP\.PRECISION = 'float16' on CPU"):
        training_dtype(True, "float16", "cpu", "SOLVER.AMP.PRECISION")
    with pytest.raises(ValueError, match=r"train\.amp\.precision must be one of"):
        training_dtype(True, "bf16", "cpu", "train.amp.precision")
    assert training_dtype(False, "float16", "cpu", "SOLVER.AMP.PRECISION") is None  # AMP off
    test_cfg = cfg.clone()
    test_cfg.TEST.AMP.ENABLED = True
    test_cfg.TEST.AMP.PRECISION = "float16"
    with pytest.raises(ValueError, match=r"TEST\.AMP\.PRECISION .*'float16' on CPU"):
        build_model(test_cfg)
    # On CUDA, float16 is detectron2's AMPTrainer (fp16 with its GradScaler), bfloat16 ours.
    assert training_dtype(True, "auto", "cuda", "SOLVER.AMP.PRECISION") == torch.float16
    if torch.cuda.is_available():
        model = build_model(cfg).to("cuda").train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        trainers = [
            build_step_trainer(model, [], optimizer, dtype, "cuda")
            for dtype in (None, torch.float16, torch.bfloat16)
        ]
        assert [type(t) for t in trainers] == [SimpleTrainer, AMPTrainer, AutocastTrainer]


def test_keys_another_model_would_ignore_are_refused_by_name():
    """MODEL.CHANNELS_LAST and TEST.AMP are read by FocalRetinaNet; the FocalRPN config's
    GeneralizedRCNN would ignore them, so its config refuses them (SOLVER.AMP trains it). A
    misspelt precision is refused also while AMP is off."""
    from retinanet_plugin.config import load_config

    rpn = str(REPO / "configs" / "faster_rcnn_focal_rpn_R_50_FPN_1x.yaml")
    for key in ("MODEL.CHANNELS_LAST", "TEST.AMP.ENABLED"):
        with pytest.raises(ValueError, match=rf"{key} True is read only by FocalRetinaNet.*"
                                             "GeneralizedRCNN would ignore it"):
            load_config(rpn, [key, "True"])
    assert load_config(rpn, ["SOLVER.AMP.ENABLED", "True"]).SOLVER.AMP.ENABLED
    with pytest.raises(ValueError, match=r"TEST\.AMP\.PRECISION must be one of .* got 'bf16'"):
        load_config(str(DEMO_YAML), ["TEST.AMP.PRECISION", "bf16"])


# --------------------------------------------------------------------------------------------
# End to end: train_net.py (YAML keys) and its lazy path (.py keys)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    """Three 64x80 images with one or two boxes of one category."""
    folder = tmp_path_factory.mktemp("precision_data")
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 64, "width": 80})
        for j in range(1 + i % 2):
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                "bbox": [5.0 + 20 * j, 8.0, 30.0, 24.0], "area": 720.0, "iscrowd": 0,
            })  # fmt: skip
    path = folder / "instances.json"
    path.write_text(json.dumps({
        "images": images, "annotations": annotations, "categories": [{"id": 1, "name": "c0"}],
    }))  # fmt: skip
    return path


def _load_train_net():
    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _yacs_args(tiny_coco, out, *opts):
    data = f"[['precision_tiny', '{tiny_coco}', '{tiny_coco.parent}']]"
    argv = ["--config-file", str(DEMO_YAML), "MODEL.MOBILENET.PRETRAINED", "False",
            "DATASETS.COCO_INSTANCES", data, "DATASETS.TRAIN", "('precision_tiny',)",
            "DATASETS.TEST", "()", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
            "DATALOADER.NUM_WORKERS", "0", "SEED", "1", "OUTPUT_DIR", str(out), *opts]  # fmt: skip
    return default_argument_parser().parse_args(argv)


def test_yacs_bf16_run_saves_a_float32_checkpoint(tiny_coco, tmp_path):
    train_net = _load_train_net()
    with pytest.raises(ValueError, match=r"SOLVER\.AMP\.PRECISION = 'float16' on CPU"):
        train_net.Trainer(train_net.setup(_yacs_args(
            tiny_coco, tmp_path / "fp16", "SOLVER.AMP.ENABLED", "True",
            "SOLVER.AMP.PRECISION", "float16",
        )))  # fmt: skip

    cfg = train_net.setup(_yacs_args(tiny_coco, tmp_path / "run", "SOLVER.AMP.ENABLED", "True"))
    trainer = train_net.Trainer(cfg)
    assert type(trainer._trainer) is AutocastTrainer
    conv_dtypes = _dtypes_of(trainer.model.head.cls_score)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert conv_dtypes == [(True, torch.bfloat16)] * (LEVELS * 2)

    # Nothing bfloat16 reached the checkpoint: weights, optimizer state, everything float32.
    checkpoint = torch.load(tmp_path / "run" / "model_final.pth", weights_only=False)
    assert _floating_dtypes(checkpoint) == {torch.float32}

    # Loaded into a model that never used bfloat16, the checkpoint detects exactly what the
    # trained model does in float32.
    trained = trainer.model.eval()
    fp32_cfg = cfg.clone()
    fp32_cfg.defrost()
    fp32_cfg.SOLVER.AMP.ENABLED = False
    fresh = build_model(fp32_cfg).eval()
    RetinaNetCheckpointer(fresh).load(str(tmp_path / "run" / "model_final.pth"))
    image = _image(3)[:, :64, :80]
    for model in (trained, fresh):
        model.test_score_thresh = 0.0  # random weights: scores near the prior pi = 0.01
    expected, got = _detect(trained, image), _detect(fresh, image)
    assert len(got) > 0
    assert torch.equal(got.scores, expected.scores)
    assert torch.equal(got.pred_boxes.tensor, expected.pred_boxes.tensor)

    # TEST.AMP.ENABLED: the same weights run inference in bfloat16.
    fp32_cfg.TEST.AMP.ENABLED = True
    bf16 = build_model(fp32_cfg).eval()
    RetinaNetCheckpointer(bf16).load(str(tmp_path / "run" / "model_final.pth"))
    bf16_dtypes = _dtypes_of(bf16.head.cls_score)
    _detect(bf16, image)
    assert bf16_dtypes == [(False, torch.bfloat16)] * LEVELS


LAZY_CONFIG = '''
from detectron2.config import LazyConfig

from retinanet_plugin.lazy import coco_instances, register_datasets

_base = LazyConfig.load({demo!r})
model, dataloader, optimizer, lr_multiplier, train = (
    _base[k] for k in ("model", "dataloader", "optimizer", "lr_multiplier", "train")
)
model.backbone.bottom_up.features.pretrained = False
model.test_score_thresh = 0.0
dataloader.coco_instances = coco_instances(
    [["precision_lazy_tiny", {json!r}, {root!r}]], relative_to=__file__
)
dataloader.train.dataset.names = "precision_lazy_tiny"
dataloader.test.dataset.names = "precision_lazy_tiny"
dataloader.train.mapper.augmentations[0].short_edge_length = (64,)
dataloader.train.mapper.augmentations[0].max_size = 96
dataloader.test.mapper.augmentations[0].short_edge_length = 64
dataloader.test.mapper.augmentations[0].max_size = 96
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.num_workers = 0
train.max_iter = 2
train.eval_period = 0
train.seed = 1
register_datasets(dataloader)
'''


def test_lazy_keys_train_and_evaluate_in_bf16_channels_last(tiny_coco, tmp_path, monkeypatch):
    from retinanet_plugin.engine import lazy_train

    config = tmp_path / "tiny_lazy.py"
    config.write_text(
        LAZY_CONFIG.format(demo=str(DEMO_PY), json=str(tiny_coco), root=str(tiny_coco.parent))
    )

    def args(*opts):
        argv = ["--config-file", str(config), f"train.output_dir={tmp_path / 'run'}", *opts]
        return default_argument_parser().parse_args(argv)

    with pytest.raises(ValueError, match=r"train\.amp\.precision = 'float16' on CPU"):
        lazy_train.lazy_main(args("train.amp.enabled=True", "train.amp.precision=float16"))
    # Keys read only at the first evaluation are refused before the training, not after it.
    with pytest.raises(ValueError, match=r"model\.test_amp_precision\) = 'float16' on CPU"):
        lazy_train.lazy_main(args("model.test_amp_precision=float16"))
    with pytest.raises(ValueError, match=r"dataloader\.report has unknown keys \['score_thr'\]"):
        lazy_train.lazy_main(args("dataloader.report.score_thr=0.4"))
    assert not (tmp_path / "run" / "model_final.pth").exists()

    built = []

    def recording_build(model, *rest):
        trainer = lazy_train_build(model, *rest)
        built.append((trainer, _dtypes_of(model.head.cls_score), _batch_formats(model)))
        return trainer

    lazy_train_build = lazy_train.build_step_trainer
    monkeypatch.setattr(lazy_train, "build_step_trainer", recording_build)
    results = lazy_train.lazy_main(args(
        "train.amp.enabled=True", "model.channels_last=True", "model.test_amp_precision=bfloat16",
    ))  # fmt: skip

    assert "bbox" in results  # the final evaluation ran
    (trainer, conv_dtypes, batch_formats), = built
    assert type(trainer) is AutocastTrainer
    # Two bfloat16 training steps, then the 3-image evaluation in bfloat16; every batch in
    # channels-last format.
    assert conv_dtypes == [(True, torch.bfloat16)] * (LEVELS * 2) + [(False, torch.bfloat16)] * (
        LEVELS * 3
    )
    assert batch_formats == [True] * 5
    weight = trainer.model.head.cls_score.weight
    assert weight.dtype == torch.float32
    assert weight.is_contiguous(memory_format=torch.channels_last)
