"""One post-processing description: every test-time key is read once (PostProcessing), reaches
eager inference, TTA and export alike, and a path that cannot honour a key refuses it by name."""

import dataclasses

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

import retinanet_plugin.postprocess as postprocess
from retinanet_plugin import add_retinanet_plugin_config
from retinanet_plugin.postprocess import PATHS, TEST_TIME_KEYS, PostProcessing, UnsupportedKeyError
from retinanet_plugin.test_time_augmentation import FocalRetinaNetWithTTA

from small_config import small_retinanet_cfg

# A value other than the default for each key, as a user writes it after the key.
OTHER_VALUES = {
    "MODEL.RETINANET.SCORE_THRESH_TEST": "0.1",
    "MODEL.RETINANET.SCORE_THRESH_TEST_PER_CLASS": "[0.1, 0.2]",
    "MODEL.RETINANET.TOPK_CANDIDATES_TEST": "500",
    "MODEL.RETINANET.NMS_THRESH_TEST": "0.6",
    "MODEL.RETINANET.NMS_TYPE": "soft_gaussian",
    "MODEL.RETINANET.SOFT_NMS_SIGMA": "0.3",
    "MODEL.RETINANET.SOFT_NMS_SCORE_THRESH": "0.01",
    "MODEL.RETINANET.NMS_CLASS_AGNOSTIC": "True",
    "MODEL.RETINANET.BOX_VOTING": "True",
    "MODEL.RETINANET.BOX_VOTING_IOU_THRESH": "0.7",
    "TEST.DETECTIONS_PER_IMAGE": "50",
    "TEST.AUG.ENABLED": "True",
}


def _cfg(*opts):
    cfg = small_retinanet_cfg(num_convs=1)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = 2
    cfg.merge_from_list(list(opts))
    return cfg


def test_the_table_lists_every_field_once():
    fields = [f.name for f in dataclasses.fields(PostProcessing)]
    assert sorted(k.field for k in TEST_TIME_KEYS) == sorted(fields)
    assert all(set(k.paths) <= set(PATHS) for k in TEST_TIME_KEYS)


def test_defaults_are_detectron2s_config():
    """A refusal's override is the field's default: it must be the config's default too."""
    cfg = get_cfg()
    add_retinanet_plugin_config(cfg)
    cfg.MODEL.RETINANET.NUM_CLASSES = 2
    assert PostProcessing.from_config(cfg) == PostProcessing()


@pytest.mark.parametrize("spec", TEST_TIME_KEYS, ids=lambda k: k.key)
def test_each_key_reaches_its_field_and_only_it(spec):
    base = PostProcessing.from_config(_cfg())
    changed = PostProcessing.from_config(_cfg(spec.key, OTHER_VALUES[spec.key]))
    differ = [
        f.name for f in dataclasses.fields(PostProcessing)
        if getattr(base, f.name) != getattr(changed, f.name)
    ]  # fmt: skip
    assert differ == [spec.field]


def test_model_tta_and_export_read_the_configs_description():
    opts = [x for key, value in OTHER_VALUES.items() for x in (key, value)]
    cfg = _cfg(*opts)
    described = PostProcessing.from_config(cfg)
    model = build_model(cfg).eval()
    # The model alone never augments; its TTA wrapper does.
    assert model.postprocessing == dataclasses.replace(described, test_augmentation=False)
    assert FocalRetinaNetWithTTA(cfg, model).postprocessing == described
    # Attributes set after construction are what every path reads.
    model.nms_class_agnostic = False
    assert not model.postprocessing.class_agnostic


def test_refusal_names_the_key_and_the_override():
    pp = PostProcessing(test_augmentation=True)
    assert pp.unsupported("tta") == []
    assert pp.unsupported("export") == [
        "TEST.AUG.ENABLED True cannot be expressed in an exported graph (which runs one image "
        "at one size); export with TEST.AUG.ENABLED False"
    ]
    with pytest.raises(UnsupportedKeyError, match="TEST.AUG.ENABLED"):
        pp.check("export")


def _without(path, key, monkeypatch):
    keys = [
        dataclasses.replace(k, paths=tuple(p for p in k.paths if p != path)) if k.key == key else k
        for k in TEST_TIME_KEYS
    ]
    monkeypatch.setattr(postprocess, "TEST_TIME_KEYS", tuple(keys))


def test_a_key_tta_lacks_is_refused_by_name(monkeypatch):
    """The mechanism a future key goes through: TTA reads the table at construction."""
    cfg = _cfg("MODEL.RETINANET.SCORE_THRESH_TEST_PER_CLASS", "[0.1, 0.2]")
    model = build_model(cfg).eval()
    _without("tta", "MODEL.RETINANET.SCORE_THRESH_TEST_PER_CLASS", monkeypatch)
    with pytest.raises(UnsupportedKeyError) as info:
        FocalRetinaNetWithTTA(cfg, model)
    assert str(info.value) == (
        "MODEL.RETINANET.SCORE_THRESH_TEST_PER_CLASS [0.1, 0.2] cannot be expressed in test-time "
        "augmentation; run test-time augmentation with MODEL.RETINANET.SCORE_THRESH_TEST_PER_CLASS "
        "[]"
    )


def test_a_key_without_effect_is_not_refused(monkeypatch):
    """SOFT_NMS_SIGMA matters only with Gaussian soft-NMS: with hard NMS nothing is refused."""
    _without("export", "MODEL.RETINANET.SOFT_NMS_SIGMA", monkeypatch)
    assert PostProcessing(soft_nms_sigma=0.3).unsupported("export") == []
    gaussian = PostProcessing(nms_type="soft_gaussian", soft_nms_sigma=0.3)
    assert gaussian.unsupported("export") == [
        "MODEL.RETINANET.SOFT_NMS_SIGMA 0.3 cannot be expressed in an exported graph; export "
        "with MODEL.RETINANET.SOFT_NMS_SIGMA 0.5"
    ]


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_traced_soft_nms_equals_eager_on_any_number_of_boxes(method):
    """Traced, soft-NMS runs max_detections steps whatever the number of boxes (its dummy box
    takes the picks once the real ones are gone): the same result as eager's min(max, D) steps,
    on more boxes than steps, fewer, and none."""

    def run(boxes, scores, classes):
        return postprocess.soft_nms(
            boxes, scores, classes, method=method, iou_threshold=0.3, sigma=0.5,
            score_threshold=0.05, max_detections=6,
        )  # fmt: skip

    g = torch.Generator().manual_seed(0)
    corners = torch.rand(12, 2, generator=g) * 30
    boxes = torch.cat([corners, corners + 10 + torch.rand(12, 2, generator=g) * 10], dim=1)
    scores = torch.rand(12, generator=g)
    classes = torch.randint(2, (12,), generator=g)
    traced = torch.jit.trace(run, (boxes, scores, classes), check_trace=False)
    for num in (12, 3, 0):
        expected = run(boxes[:num], scores[:num], classes[:num])
        got = traced(boxes[:num], scores[:num], classes[:num])
        assert torch.equal(got[0], expected[0]), num
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    assert len(run(boxes, scores, classes)[0]) == 6
