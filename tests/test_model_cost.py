"""Parameters and FLOPs of retinanet_plugin.analysis.model_cost against hand counts."""

import json

import pytest
import torch
from torch import nn

from retinanet_plugin.analysis import count_parameters, format_model_cost, model_cost
from retinanet_plugin.tools import model_cost as model_cost_tool

from small_config import small_retinanet_cfg


def test_single_conv_is_counted_as_multiply_adds():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    cost = model_cost(conv, inputs=torch.zeros(1, 3, 10, 10))
    # fvcore: one fused multiply-add = one flop, bias free:
    # H_out * W_out * C_out * C_in * k * k = 10 * 10 * 8 * 3 * 3 * 3 = 21,600 (2x: 43,200 elsewhere)
    assert cost["flops"]["total"] == 21_600
    assert cost["flops"]["by_operator"] == {"conv": 21_600}
    # 8 * 3 * 3 * 3 weights + 8 biases = 224
    assert cost["params"]["total"] == cost["params"]["trainable"] == 224


def test_frozen_parameters_are_not_trainable():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    model[0].weight.requires_grad_(False)
    cost = model_cost(model, inputs=torch.zeros(3, 4))
    # (4 * 5 + 5) + (5 * 2 + 2) = 37 parameters, 20 of them frozen
    assert cost["params"]["total"] == 37 == sum(p.numel() for p in model.parameters())
    assert cost["params"]["trainable"] == 17
    # 3 rows x (4 * 5 + 5 * 2) multiply-adds = 90
    assert cost["flops"]["total"] == 90
    assert model.training  # the mode is restored


@pytest.fixture(scope="module")
def tiny_cfg():
    cfg = small_retinanet_cfg(num_convs=1)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = 2
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    return cfg


@pytest.fixture(scope="module")
def tiny_cost(tiny_cfg):
    return model_cost(tiny_cfg, (32, 48))


def test_detector_parts_match_hand_counts(tiny_cfg, tiny_cost):
    cost = tiny_cost
    # A 32x48 image resized to a 64 px short side: 64x96, already a multiple of the FPN's
    # size divisibility (32, the stride of res5).
    assert cost["image_size"] == [32, 48]
    assert cost["input_size"] == [64, 96]
    assert cost["padded_size"] == [64, 96]
    flops = cost["flops"]["parts"]
    # Positions on P3-P7: 8x12 + 4x6 + 2x3 + 1x2 + 1x1 (3x3 convs of stride 2 with padding 1
    # halve rounding up) = 96 + 24 + 6 + 2 + 1 = 129.
    # Head, C = 16 channels, A = 9 anchors, K = 2 classes, one conv per branch, per position:
    # 2 x (9 * 16 * 16) subnet convs + 9 * 16 * (9 * 2) cls_score + 9 * 16 * (9 * 4) bbox_pred
    # = 4608 + 2592 + 5184 = 12,384
    assert flops["head"] == 129 * 12_384 == 1_597_536
    # FPN on ResNet-18's res3 / res4 / res5 (128 / 256 / 512 channels on 96 / 24 / 6 positions):
    lateral = 96 * 128 * 16 + 24 * 256 * 16 + 6 * 512 * 16  # 1x1 convs: 344,064
    output = (96 + 24 + 6) * 9 * 16 * 16  # 3x3 convs: 290,304
    upsample = 16 * 24 + 16 * 96  # nearest x2 of P5 and P4, one per output value: 1,920
    p6p7 = 2 * 9 * 512 * 16 + 1 * 9 * 16 * 16  # P6 (1x2) from res5, P7 (1x1) from P6: 149,760
    assert flops["fpn"] == lateral + output + upsample + p6p7 == 786_048
    # Nothing outside the parts has multiply-adds (normalisation is element-wise).
    assert flops["other"] == 0
    assert sum(flops.values()) == cost["flops"]["total"]


def test_detector_parameters_by_part(tiny_cfg, tiny_cost):
    from detectron2.modeling import build_model

    model = build_model(tiny_cfg)
    params = tiny_cost["params"]
    assert params["total"] == sum(p.numel() for p in model.parameters())
    assert params["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = params["parts"]
    assert parts["trunk"]["params"] == sum(
        p.numel() for p in model.backbone.bottom_up.parameters())
    assert parts["head"]["params"] == sum(p.numel() for p in model.head.parameters())
    # Head: 2 x (9 * 16 * 16 + 16) subnet + (9 * 16 * 18 + 18) + (9 * 16 * 36 + 36)
    # = 4,640 + 2,610 + 5,220 = 12,470
    assert parts["head"]["params"] == 12_470
    # FREEZE_AT 2 freezes ResNet-18's stem (7 * 7 * 3 * 64 = 9,408) and res2 (4 convs of
    # 3 * 3 * 64 * 64 = 36,864); its norm is FrozenBN (buffers, no parameters).
    frozen = 9_408 + 4 * 36_864
    assert parts["trunk"]["params"] - parts["trunk"]["trainable"] == frozen
    assert sum(p["params"] for p in parts.values()) == params["total"]
    assert "trunk" in format_model_cost(tiny_cost) and "12,470" in format_model_cost(tiny_cost)


def test_tool_prints_and_writes_json(tiny_cfg, tiny_cost, tmp_path, capsys):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(tiny_cfg.dump())
    out = tmp_path / "cost.json"
    # Flags may follow the overrides, as in train_net.py.
    cost = model_cost_tool.main(["--config-file", str(config_file), "MODEL.RETINANET.NUM_CLASSES",
                                 "2", "--image-size", "32", "48", "--json", str(out)])
    assert cost["flops"]["total"] == tiny_cost["flops"]["total"]
    assert json.loads(out.read_text())["params"]["total"] == tiny_cost["params"]["total"]
    assert "| head | head | 12,470 | 12,470 |" in capsys.readouterr().out


def test_model_without_size_is_refused():
    conv = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="image_size"):
        model_cost(conv)
    assert count_parameters(conv)["total"] == 12
