"""Every validation error of FocalRetinaNet and FocalRPN names the config key to change.

FocalRPN reads MODEL.RETINANET's head, loss and normaliser keys with objectness as the K = 1
case, so its messages must never send the user to MODEL.RETINANET.NUM_CLASSES, which has no
effect there.
"""

import pytest
import torch

from detectron2.modeling import build_model

from small_config import small_focal_rpn_cfg, small_retinanet_cfg

_rpn_cfg = small_focal_rpn_cfg


def _retinanet_cfg(*opts):
    cfg = small_retinanet_cfg(num_convs=1)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.merge_from_list(list(opts))
    return cfg


# Levels of a plain ResNet-18 (no FPN): res4 has 256 channels, res5 512.
NO_FPN = ["MODEL.BACKBONE.NAME", "build_resnet_backbone",
          "MODEL.RESNETS.OUT_FEATURES", ["res4", "res5"],
          "MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64]]]  # fmt: skip

CASES = {
    # 80 values (a COCO RetinaNet config reused) used to be refused as "must have NUM_CLASSES
    # = 1 values", naming a key FocalRPN overrides.
    "rpn_per_class_alpha": (
        _rpn_cfg, ["MODEL.RETINANET.FOCAL_LOSS_ALPHA_PER_CLASS", [0.25] * 80],
        "MODEL.RETINANET.FOCAL_LOSS_ALPHA_PER_CLASS",
    ),
    "ohem_positive_fraction": (
        _retinanet_cfg, ["MODEL.RETINANET.CLS_LOSS", "OHEMLoss",
                         "MODEL.RETINANET.FOCAL_LOSS_ALPHA", -1.0,
                         "MODEL.RETINANET.OHEM.POSITIVE_FRACTION", 1.5],
        "MODEL.RETINANET.OHEM.POSITIVE_FRACTION",
    ),
    "rpn_momentum": (
        _rpn_cfg, ["MODEL.RETINANET.LOSS_NORMALIZER_MOMENTUM", 1.0],
        "MODEL.RETINANET.LOSS_NORMALIZER_MOMENTUM",
    ),
    "rpn_init": (
        _rpn_cfg, ["MODEL.RETINANET.LOSS_NORMALIZER_INIT", 0.0],
        "MODEL.RETINANET.LOSS_NORMALIZER_INIT",
    ),
    "rpn_missing_level": (
        _rpn_cfg, ["MODEL.RPN.IN_FEATURES", ["p2", "p9"]], "MODEL.RPN.IN_FEATURES"
    ),
    "rpn_channels": (
        _rpn_cfg, NO_FPN + ["MODEL.RPN.IN_FEATURES", ["res4", "res5"]], "MODEL.RPN.IN_FEATURES"
    ),
    "rpn_nms": (_rpn_cfg, ["MODEL.RPN.NMS_THRESH", 1.5], "MODEL.RPN.NMS_THRESH"),
    "rpn_anchor_levels": (
        _rpn_cfg, ["MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64]]], "MODEL.ANCHOR_GENERATOR.SIZES"
    ),
    "retinanet_anchor_levels": (
        _retinanet_cfg, ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5], [1.0]]],
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
    ),
    "retinanet_momentum": (
        _retinanet_cfg, ["MODEL.RETINANET.LOSS_NORMALIZER_MOMENTUM", -0.1],
        "MODEL.RETINANET.LOSS_NORMALIZER_MOMENTUM",
    ),
    "retinanet_init": (
        _retinanet_cfg, ["MODEL.RETINANET.LOSS_NORMALIZER_INIT", -1.0],
        "MODEL.RETINANET.LOSS_NORMALIZER_INIT",
    ),
    "retinanet_channels": (
        _retinanet_cfg, NO_FPN + ["MODEL.RETINANET.IN_FEATURES", ["res4", "res5"]],
        "MODEL.RETINANET.IN_FEATURES",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_names_the_key(case):
    make_cfg, opts, key = CASES[case]
    with pytest.raises(ValueError) as info:
        build_model(make_cfg(*opts))
    assert key in str(info.value)
    if case.startswith("rpn"):
        assert "NUM_CLASSES" not in str(info.value)


@pytest.mark.parametrize("per_class_alpha", [[], [0.3]])
def test_rpn_accepts_one_or_no_per_class_alpha(per_class_alpha):
    model = build_model(_rpn_cfg("MODEL.RETINANET.FOCAL_LOSS_ALPHA_PER_CLASS", per_class_alpha))
    assert model.proposal_generator.rpn_head.num_classes == 1


def test_rpn_checkpoint_head_mismatch_points_at_the_anchors():
    """A cls_score for 5 anchors per location into FocalRPN's 3-anchor head: the advice is the
    anchor generator, not MODEL.RETINANET.NUM_CLASSES (fixed at 1 here)."""
    head = build_model(_rpn_cfg()).proposal_generator.rpn_head
    state = {k: v.clone() for k, v in head.state_dict().items()}
    state["cls_score.weight"] = torch.zeros(5, *state["cls_score.weight"].shape[1:])
    state["cls_score.bias"] = torch.zeros(5)
    with pytest.raises(ValueError) as info:
        head.load_state_dict(state)
    message = str(info.value)
    assert "MODEL.ANCHOR_GENERATOR" in message and "NUM_CLASSES" not in message
    assert "has 5 output channels but this head has 3" in message  # A*K = 3 anchors x 1 class


def test_retinanet_checkpoint_head_mismatch_still_names_num_classes():
    head = build_model(_retinanet_cfg("MODEL.RETINANET.NUM_CLASSES", 2)).head
    state = {k: v.clone() for k, v in head.state_dict().items()}
    # 9 anchors x 3 classes = 27 rows where the head has 9 x 2 = 18.
    state["cls_score.weight"] = torch.zeros(27, *state["cls_score.weight"].shape[1:])
    state["cls_score.bias"] = torch.zeros(27)
    with pytest.raises(ValueError, match=r"3 classes x 9 anchors.*Set MODEL.RETINANET.NUM_CLASSES"):
        head.load_state_dict(state)
