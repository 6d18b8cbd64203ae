"""The classification-loss registry: build by name, config validation, and the OHEM baseline."""

import pytest
import torch
from torch.nn import functional as F

from detectron2.config import get_cfg

from retinanet_plugin import add_retinanet_plugin_config
from retinanet_plugin.losses import (
    CLS_LOSS_REGISTRY,
    OHEMLoss,
    build_cls_loss,
    sigmoid_focal_loss_reference,
    sigmoid_focal_loss_star_reference,
    softmax_focal_loss,
)

NAMES = ["SigmoidFocalLoss", "SigmoidFocalLossStar", "SoftmaxFocalLoss", "AlphaBalancedCE",
         "OHEMLoss"]


def _cfg(**retinanet):
    cfg = add_retinanet_plugin_config(get_cfg())
    cfg.MODEL.RETINANET.NUM_CLASSES = 4
    for key, value in retinanet.items():
        cfg.MODEL.RETINANET[key] = value
    return cfg


def _batch(n=2, r=30, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, r, k, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(-1, k + 1, (n, r), generator=g)
    xy = torch.rand(r, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + 10 + torch.rand(r, 2, generator=g) * 20], dim=1)
    return logits, labels, anchors


def _dense(logits, labels):
    k = logits.shape[-1]
    valid = labels >= 0
    one_hot = F.one_hot(labels.clamp(min=0), k + 1)[..., :k].to(logits.dtype)
    return logits[valid], one_hot[valid]


def test_every_paper_loss_is_registered_and_builds_by_name():
    logits, labels, anchors = _batch()
    for name in NAMES:
        assert name in CLS_LOSS_REGISTRY
        loss = build_cls_loss(_cfg(CLS_LOSS=name))
        assert type(loss).__name__ == name
        value = loss(logits.requires_grad_(), labels, anchors=anchors)
        assert value.dim() == 0 and torch.isfinite(value) and value > 0


def test_unknown_loss_lists_registered_names():
    with pytest.raises(KeyError, match="MODEL.RETINANET.CLS_LOSS.*SigmoidFocalLoss"):
        build_cls_loss(_cfg(CLS_LOSS="FocalLos"))


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("FOCAL_LOSS_GAMMA", -0.5, "MODEL.RETINANET.FOCAL_LOSS_GAMMA must be >= 0"),
        ("FOCAL_LOSS_ALPHA", 1.5, r"MODEL.RETINANET.FOCAL_LOSS_ALPHA must be in \[0, 1\]"),
        ("FOCAL_LOSS_ALPHA_PER_CLASS", [0.25, 0.5], "must have MODEL.RETINANET.NUM_CLASSES"),
    ],
)
def test_bad_config_values_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_cls_loss(_cfg(**{key: value}))


def test_star_needs_positive_gamma():
    with pytest.raises(ValueError, match="FOCAL_LOSS_GAMMA must be > 0 for FL"):
        build_cls_loss(_cfg(CLS_LOSS="SigmoidFocalLossStar", FOCAL_LOSS_GAMMA=0.0))


def test_registered_losses_equal_their_definitions():
    logits, labels, anchors = _batch()
    x, t = _dense(logits, labels)
    fl = build_cls_loss(_cfg())(logits, labels)
    torch.testing.assert_close(fl, sigmoid_focal_loss_reference(x, t, 0.25, 2.0, "sum"))
    ce = build_cls_loss(_cfg(CLS_LOSS="AlphaBalancedCE", FOCAL_LOSS_ALPHA=0.75))(logits, labels)
    torch.testing.assert_close(ce, sigmoid_focal_loss_reference(x, t, 0.75, 0.0, "sum"))
    star = build_cls_loss(_cfg(CLS_LOSS="SigmoidFocalLossStar", FOCAL_LOSS_GAMMA=2.0,
                               FOCAL_LOSS_STAR_BETA=1.0, FOCAL_LOSS_ALPHA=-1.0))(logits, labels)
    torch.testing.assert_close(star, sigmoid_focal_loss_star_reference(x, t, 2.0, 1.0, -1, "sum"))
    per_class = [0.1, 0.2, 0.3, 0.4]
    weighted = build_cls_loss(_cfg(FOCAL_LOSS_ALPHA_PER_CLASS=per_class))(logits, labels)
    a = torch.tensor(per_class, dtype=torch.float64)
    manual = (sigmoid_focal_loss_reference(x, t, -1, 2.0) * (t * a + (1 - t) * (1 - a))).sum()
    torch.testing.assert_close(weighted, manual)


def test_softmax_loss_uses_an_implicit_zero_background_logit():
    logits, labels, _ = _batch()
    loss = build_cls_loss(_cfg(CLS_LOSS="SoftmaxFocalLoss"))(logits, labels)
    flat = logits.reshape(-1, 4)
    with_bg = torch.cat([flat, torch.zeros(flat.shape[0], 1, dtype=flat.dtype)], dim=1)
    expected = softmax_focal_loss(with_bg, labels.reshape(-1), 0.25, 2.0, 4, "sum")
    torch.testing.assert_close(loss, expected)


def test_ohem_trains_only_the_mined_anchors():
    logits, labels, anchors = _batch(n=2, r=200)
    labels[labels < 0] = 4  # no ignored anchors, so every anchor is a candidate
    ohem = OHEMLoss(alpha=-1.0, batch_size_per_image=16, nms_thresh=0.7)
    logits.requires_grad_()
    ohem(logits, labels, anchors=anchors).backward()
    rows_with_grad = (logits.grad != 0).any(-1).sum(-1)
    assert (rows_with_grad <= 16).all() and (rows_with_grad > 0).all()
    # The mined anchors of an image are the hardest ones that NMS keeps: the hardest anchor of
    # each image is always among them.
    per_anchor = sigmoid_focal_loss_reference(logits.detach(), _onehot(labels), -1, 0.0).sum(-1)
    hardest = per_anchor.argmax(-1)
    assert (logits.grad[torch.arange(2), hardest] != 0).any(-1).all()


def _onehot(labels):
    return F.one_hot(labels, 5)[..., :4].double()


def test_ohem_nms_drops_duplicate_anchors_and_respects_ratio():
    logits = torch.zeros(1, 6, 2, dtype=torch.float64)
    logits[0, :, 0] = torch.tensor([5.0, 4.9, 1.0, 0.5, 3.0, 2.0])
    labels = torch.tensor([[2, 2, 2, 2, 0, 2]])  # anchor 4 is foreground (class 0)
    box = torch.tensor([0.0, 0.0, 10.0, 10.0])
    anchors = torch.stack([box, box, box + 100, box + 200, box + 300, box + 400])
    # Per-anchor CE (K = 2, second logit 0 adds log 2 each): background anchors cost
    # softplus(x) + log 2, i.e. 5.70, 5.60, 2.00, 1.66, -, 2.82 for anchors 0..5; foreground anchor
    # 4 costs softplus(-3) + log 2 = 0.74. Anchors 0 and 1 coincide: NMS keeps only the harder (0),
    # then batch 3 takes the next hardest, 5 and 2.
    ohem = OHEMLoss(batch_size_per_image=3, nms_thresh=0.5)
    logits.requires_grad_()
    ohem(logits, labels, anchors=anchors).backward()
    assert torch.nonzero((logits.grad != 0).any(-1)[0]).flatten().tolist() == [0, 2, 5]
    # With a 1:3 ratio (positive fraction 0.25) and batch 4, one foreground slot and 3 background.
    logits.grad = None
    OHEMLoss(batch_size_per_image=4, nms_thresh=0.5, positive_fraction=0.25)(
        logits, labels, anchors=anchors).backward()
    assert torch.nonzero((logits.grad != 0).any(-1)[0]).flatten().tolist() == [0, 2, 4, 5]
    with pytest.raises(ValueError, match="needs the anchor boxes"):
        ohem(logits, labels)


@pytest.mark.parametrize("name", ["SigmoidFocalLoss", "SigmoidFocalLossStar", "AlphaBalancedCE"])
@pytest.mark.parametrize("per_class", [[-1.0, 0.25, 0.25, 0.25], [0.25, 0.25, 1.25, 0.25]])
def test_per_class_alpha_outside_zero_one_is_refused_by_name(name, per_class):
    # Issue 11.1: [-1, 0.25, ...] passed (a negative scalar alpha means "disabled") and then
    # weighed class 0's negatives by 1 - (-1) = 2 and its positives by -1: a negative loss.
    with pytest.raises(ValueError, match=r"MODEL.RETINANET.FOCAL_LOSS_ALPHA_PER_CLASS\[\d\] = "):
        build_cls_loss(_cfg(CLS_LOSS=name, FOCAL_LOSS_ALPHA_PER_CLASS=per_class))
    with pytest.raises(ValueError, match=r"alpha_per_class\[\d\] = .* must be in \[0, 1\]"):
        CLS_LOSS_REGISTRY.get(name)(alpha_per_class=per_class)


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("OHEMLoss", "FOCAL_LOSS_GAMMA", 0.5),
        ("OHEMLoss", "FOCAL_LOSS_ALPHA_PER_CLASS", [0.1, 0.2, 0.3, 0.4]),
        ("OHEMLoss", "FOCAL_LOSS_STAR_BETA", 1.0),
        ("SoftmaxFocalLoss", "FOCAL_LOSS_ALPHA_PER_CLASS", [0.1, 0.2, 0.3, 0.4]),
        ("AlphaBalancedCE", "FOCAL_LOSS_GAMMA", 0.0),
        ("SigmoidFocalLoss", "FOCAL_LOSS_STAR_BETA", 1.0),
        ("SigmoidFocalLoss", "OHEM.BATCH_SIZE_PER_IMAGE", 128),
        ("SigmoidFocalLossStar", "OHEM.POSITIVE_FRACTION", 0.25),
    ],
)
def test_a_key_the_loss_does_not_use_is_refused_by_name(name, key, value):
    # Issue 11.10: OHEMLoss silently trained with gamma = 0 whatever FOCAL_LOSS_GAMMA said.
    cfg = _cfg(CLS_LOSS=name)
    node, leaf = _node_and_leaf(cfg, key)
    node[leaf] = value
    with pytest.raises(ValueError, match=rf"MODEL.RETINANET.{key} = .* is not used by "
                                         rf"MODEL.RETINANET.CLS_LOSS = '{name}'"):
        build_cls_loss(cfg)


def _node_and_leaf(cfg, key):
    """("OHEM.NMS_THRESH" -> MODEL.RETINANET.OHEM, "NMS_THRESH"), under MODEL.RETINANET."""
    node = cfg.MODEL.RETINANET
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    return node, leaf


# A non-default value for each key; every loss must change its value when a key it declares
# changes, so that config_keys cannot claim a key the loss ignores.
_CHANGED = {
    "FOCAL_LOSS_ALPHA": 0.6,
    "FOCAL_LOSS_GAMMA": 1.0,
    "FOCAL_LOSS_ALPHA_PER_CLASS": [0.1, 0.9, 0.3, 0.7],
    "FOCAL_LOSS_STAR_BETA": 1.0,
    "OHEM.BATCH_SIZE_PER_IMAGE": 8,
    "OHEM.NMS_THRESH": 0.3,
    "OHEM.POSITIVE_FRACTION": 0.25,
}


@pytest.mark.parametrize("name", NAMES)
def test_every_declared_key_changes_the_loss(name, monkeypatch):
    # Eager kernels: this is about which keys reach the loss, and new gamma / alpha variants
    # would each cost a compilation.
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")
    logits, labels, anchors = _batch(r=200)
    loss_cls = CLS_LOSS_REGISTRY.get(name)
    assert set(loss_cls.config_keys) <= set(_CHANGED)
    base_cfg = _cfg(CLS_LOSS=name)
    if name == "SigmoidFocalLossStar":
        base_cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA = 0.25  # so that alpha_per_class matters
    if name == "OHEMLoss":
        base_cfg.MODEL.RETINANET.OHEM.BATCH_SIZE_PER_IMAGE = 32
    base = build_cls_loss(base_cfg)(logits, labels, anchors=anchors)
    for key in loss_cls.config_keys:
        cfg = base_cfg.clone()
        node, leaf = _node_and_leaf(cfg, key)
        node[leaf] = _CHANGED[key]
        changed = build_cls_loss(cfg)(logits, labels, anchors=anchors)
        assert not torch.allclose(changed, base), f"{name} ignores {key}"
