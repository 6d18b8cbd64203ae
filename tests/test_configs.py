"""Every YAML under configs/ merges into a plugin config and builds the model it describes."""

from pathlib import Path

import pytest

from detectron2.config import get_cfg
from detectron2.modeling import build_model

import retinanet_plugin  # noqa: F401  (registers FocalRetinaNet, its head, losses, backbone)
from retinanet_plugin import FocalRetinaNet, add_retinanet_plugin_config
from retinanet_plugin.config import load_config_file

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


def _load(path):
    cfg = get_cfg()
    add_retinanet_plugin_config(cfg)
    load_config_file(cfg, str(path))  # the safe loader train_net.py uses
    # No downloads and no GPU in a unit test: random weights on CPU.
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.MOBILENET.PRETRAINED = False
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_configs_found():
    # Base, 4 COCO variants, 5 Table 1e scales, 13 ablations, 3 demos (more may be added).
    assert len(CONFIGS) >= 26, [str(p) for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_builds(path):
    cfg = _load(path)
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    assert next(model.parameters()).device.type == "cpu"
    if not isinstance(model, FocalRetinaNet):
        return
    rcfg = cfg.MODEL.RETINANET
    assert type(model.cls_loss).__name__ == rcfg.CLS_LOSS
    # A anchors per location = scales per level x aspect ratios (3 x 3 = 9 in the paper).
    num_anchors = len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0]) * len(
        cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0]
    )
    assert model.head.cls_score.out_channels == num_anchors * rcfg.NUM_CLASSES
    assert model.head.bbox_pred.out_channels == num_anchors * 4


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("Base-*.yaml")), ids=lambda p: p.name)
def test_base_configs_are_self_contained(path):
    text = path.read_text()
    assert "_BASE_" not in text
    assert text.rstrip().splitlines()[-1] == "VERSION: 2"


def test_variants_only_hold_differences():
    # A variant names its base; the COCO ones state the backbone and nothing of the head.
    for path in CONFIGS:
        if path.name.startswith("Base-") or path.name.startswith("faster_rcnn"):
            continue
        assert "_BASE_" in path.read_text(), path
        assert "ANCHOR_GENERATOR" not in path.read_text() or "demo" in path.name, path


def test_table1e_scales():
    for scale in (400, 500, 600, 700, 800):
        cfg = _load(CONFIG_DIR / "table1e" / f"retinanet_R_50_FPN_1x_{scale}px.yaml")
        assert cfg.INPUT.MIN_SIZE_TRAIN == (scale,) and cfg.INPUT.MIN_SIZE_TEST == scale
        assert cfg.SOLVER.MAX_ITER == 90000 and cfg.MODEL.RESNETS.DEPTH == 50


def test_demo_one_line_backbone_switch_builds():
    # The documented switch from MobileNetV2 to ResNet-FPN on the demo config.
    cfg = _load(CONFIG_DIR / "demo_deepforest_mobilenet_v2_fpn.yaml")
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone"])
    model = build_model(cfg)
    assert type(model.backbone.bottom_up).__name__ == "ResNet"
    assert model.head.cls_score.out_channels == 9 * 1  # 9 anchors x 1 class (Tree)
