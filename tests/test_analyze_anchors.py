"""The anchor analysis (retinanet_plugin.anchors; its command line, tools.analyze_anchors):
per-box coverage equals detectron2's anchors + pairwise_iou + Matcher over the whole grid;
hand-computed coverage of synthetic boxes; the proposal never covers fewer boxes; a command-line
run on the DeepForest demo data."""

import json
import re
import shlex

import cv2
import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.transforms import ResizeTransform
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_anchor_generator, build_backbone
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, BoxMode, ImageList, pairwise_iou

from retinanet_plugin import add_retinanet_plugin_config
from retinanet_plugin import anchors as aa
from retinanet_plugin.anchors import matching
from retinanet_plugin.anchors.advice import shell_lines
from retinanet_plugin.data import convert_voc_to_coco, fetch_deepforest
from retinanet_plugin.tools import analyze_anchors

CONFIGS = "configs"
STRIDES = (8, 16, 32, 64, 128)
SHAPES = {f"p{i + 3}": ShapeSpec(channels=8, stride=s) for i, s in enumerate(STRIDES)}


@pytest.fixture(autouse=True)
def _forget_registered_datasets():
    # The tool registers the datasets its config names (the demo's, with the default root), as
    # train_net.py does; other test modules register them with their own roots.
    before = set(DatasetCatalog.list())
    yield
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _cfg(sizes=None, ratios=None, offset=0.0, min_size=(400,), max_size=1333, low_quality=True):
    """The plugin's RetinaNet config (paper anchors unless given), no backbone needed."""
    cfg = get_cfg()
    add_retinanet_plugin_config(cfg)
    cfg.merge_from_file(f"{CONFIGS}/Base-FocalRetinaNet.yaml")
    if sizes is not None:
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = sizes
    if ratios is not None:
        cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = ratios
    cfg.MODEL.ANCHOR_GENERATOR.OFFSET = offset
    cfg.INPUT.MIN_SIZE_TRAIN = min_size
    cfg.INPUT.MAX_SIZE_TRAIN = max_size
    cfg.MODEL.RETINANET.ALLOW_LOW_QUALITY_MATCHES = low_quality
    return cfg


def _layout(cfg, divisibility=128):
    return aa.anchor_layout(cfg, SHAPES, divisibility)


def _full_grid(cfg, layout, height, width):
    """Every anchor detectron2 places on a (height, width) image: the generator's forward on
    feature maps of the layout's grid sizes."""
    generator = build_anchor_generator(cfg, [SHAPES[f] for f in cfg.MODEL.RETINANET.IN_FEATURES])
    feats = [torch.zeros(1, 1, h, w) for h, w in layout.grid_sizes(height, width)]
    return Boxes.cat(generator(feats))


def _brute_force(cfg, layout, boxes, height, width, fg=0.5):
    iou = pairwise_iou(Boxes(torch.as_tensor(boxes, dtype=torch.float32)),
                       _full_grid(cfg, layout, height, width))
    return iou.max(dim=1).values, (iou >= fg).sum(dim=1)


def _matcher_reference(cfg, layout, boxes, height, width, fg=0.5):
    """Per box of one image: best IoU, foreground anchors, and the foreground anchors the
    box keeps once detectron2's Matcher gives each anchor of the whole grid (all levels
    concatenated, as the model sees them) to its highest-IoU box."""
    iou = pairwise_iou(Boxes(torch.as_tensor(boxes, dtype=torch.float32)),
                       _full_grid(cfg, layout, height, width))
    matches, _ = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)(iou)
    fg_anchor = iou.max(dim=0).values >= fg
    kept = [int(((matches == g) & fg_anchor).sum()) for g in range(len(boxes))]
    return iou.max(dim=1).values, (iou >= fg).sum(dim=1).tolist(), kept


def _random_boxes(rng, n, height, width):
    """Boxes from 2 px to the whole image, aspect 1/8 to 8, some touching the borders."""
    side = np.exp(rng.uniform(np.log(2), np.log(min(height, width)), n))
    aspect = np.exp(rng.uniform(np.log(1 / 8), np.log(8), n))
    w = np.minimum(side / np.sqrt(aspect), width - 1)
    h = np.minimum(side * np.sqrt(aspect), height - 1)
    x0 = rng.uniform(0, width - w)
    y0 = rng.uniform(0, height - h)
    x0[: n // 10] = 0  # on the left / top border
    y0[n // 10: n // 5] = height - h[n // 10: n // 5]  # on the bottom border
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1)


def _box_set(boxes, height, width):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return aa.BoxSet(boxes, np.tile([height, width], (len(boxes), 1)), 1)


# ---------------------------------------------------------------------------------------------
# Exactness against the whole anchor grid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset,divisibility,chunked", [(0.0, 128, False), (0.5, 32, True)])
def test_window_search_equals_full_grid(offset, divisibility, chunked, monkeypatch):
    if chunked:  # 300 boxes in chunks of 128, IoU blocks of at most 4096 values
        monkeypatch.setattr(matching, "_BOX_CHUNK", 128)
        monkeypatch.setattr(matching, "_CHUNK_ELEMENTS", 4096)
    cfg = _cfg(offset=offset)
    layout = _layout(cfg, divisibility)
    rng = np.random.default_rng(0)
    for height, width in ((200, 249), (333, 150)):
        boxes = _random_boxes(rng, 300, height, width)
        best, num_fg, _, _ = aa.box_anchor_stats(
            torch.from_numpy(boxes), torch.tensor([[height, width]] * len(boxes)), layout, 0.5
        )
        ref_best, ref_fg = _brute_force(cfg, layout, boxes, height, width)
        assert torch.equal(num_fg, ref_fg)
        torch.testing.assert_close(best, ref_best, rtol=0, atol=1e-6)
        assert (ref_fg > 0).any() and (ref_fg == 0).any()  # both kinds of box were tested


def test_categories_follow_detectron2_matcher():
    """One box per image: the matcher's foreground anchors are the box's, and the category
    (foreground / low-quality only / uncovered) is what the Matcher does with it."""
    rng = np.random.default_rng(1)
    height, width = 256, 320
    boxes = _random_boxes(rng, 60, height, width)
    for low_quality in (True, False):
        cfg = _cfg(min_size=(height,), max_size=width, low_quality=low_quality)
        layout = _layout(cfg)
        cov = aa.measure_coverage(_box_set(boxes, height, width), cfg, layout, [height])
        matcher = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=low_quality)
        anchors = _full_grid(cfg, layout, height, width)
        for i, box in enumerate(boxes):
            iou = pairwise_iou(Boxes(torch.tensor(box[None], dtype=torch.float32)), anchors)
            _, labels = matcher(iou)
            n_fg_matcher = int((labels == 1).sum())
            if cov.foreground[i]:
                assert n_fg_matcher == cov.num_fg[i]
            assert (n_fg_matcher > 0) == (cov.foreground[i] or cov.low_quality_only[i])
        assert cov.low_quality_only.any() == low_quality


def test_kept_anchors_equal_matcher_on_crowded_images(monkeypatch):
    """Overlapping boxes compete for anchors: each box keeps the foreground anchors whose
    highest-IoU box it is, as detectron2's Matcher assigns them over the whole grid. Two images
    of 40 boxes around 3 centres, processed in image-aligned chunks of 30 boxes."""
    monkeypatch.setattr(matching, "_BOX_CHUNK", 30)
    cfg = _cfg()
    layout = _layout(cfg)
    matcher = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)
    rng = np.random.default_rng(5)
    sizes = [(256, 320), (200, 249)]
    per_image = []
    for height, width in sizes:
        centres = rng.uniform(60, 180, (3, 2))[rng.integers(0, 3, 40)]
        half = rng.uniform(15, 40, (40, 2))
        jitter = rng.normal(0, 6, (40, 2))
        per_image.append(np.clip(np.hstack([centres + jitter - half, centres + jitter + half]),
                                 0, [width, height, width, height]))
    per_image[0][5] = per_image[0][0]  # a duplicate annotation: ties go to the first box
    boxes = np.concatenate(per_image)
    hw = torch.tensor([sizes[0]] * 40 + [sizes[1]] * 40)
    index = torch.tensor([0] * 40 + [1] * 40)
    _, num_fg, _, kept = aa.box_anchor_stats(torch.from_numpy(boxes), hw, layout, 0.5, index)
    expected = []
    for (height, width), image_boxes in zip(sizes, per_image):
        iou = pairwise_iou(Boxes(torch.as_tensor(image_boxes, dtype=torch.float32)),
                           _full_grid(cfg, layout, height, width))
        matches, _ = matcher(iou)
        matched_iou = iou.max(dim=0).values
        expected += [int(((matches == g) & (matched_iou >= 0.5)).sum()) for g in range(40)]
    assert kept.tolist() == expected
    assert kept[5] == 0 < kept[0]  # the duplicate (box 5) loses every anchor to box 0
    assert (kept < num_fg).sum() > 10  # neighbours did take anchors
    # Chunks end at image boundaries; an image larger than the chunk is one chunk.
    assert matching._image_aligned_cuts(np.array([0, 0, 1, 1, 1, 2, 3, 3]), 3) == [0, 2, 5, 8]
    assert matching._image_aligned_cuts(np.array([0, 0, 1, 1, 1, 2, 3, 3]), 1) == [0, 2, 5, 6, 8]


def test_kept_anchors_equal_matcher_on_random_images():
    """300 images (256x320) of 4 random boxes each (32 to 256 px, aspect 1/2 to 2, so that
    boxes have foreground anchors on two levels and neighbours compete): every box's kept
    foreground anchors equal detectron2's Matcher over the generator's anchors of all levels
    concatenated, with each image alone in its call and with all 300 in one call, as
    measure_coverage passes a dataset. An anchor of one level is never another level's."""
    height, width = 256, 320
    cfg = _cfg()
    layout = _layout(cfg)
    rng = np.random.default_rng(7)
    side = np.exp(rng.uniform(np.log(32), np.log(256), 1200))
    aspect = np.exp(rng.uniform(np.log(1 / 2), np.log(2), 1200))
    w = np.minimum(side / np.sqrt(aspect), width - 1)
    h = np.minimum(side * np.sqrt(aspect), height - 1)
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    boxes = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
    hw = torch.tensor([[height, width]] * 1200)
    index = torch.arange(300).repeat_interleave(4)
    reference = [_matcher_reference(cfg, layout, boxes[4 * i: 4 * i + 4], height, width)
                 for i in range(300)]
    ref_fg = [n for _, fg, _ in reference for n in fg]
    ref_kept = [n for _, _, kept in reference for n in kept]
    alone = [aa.box_anchor_stats(torch.from_numpy(boxes[4 * i: 4 * i + 4]), hw[:4], layout, 0.5,
                                 torch.zeros(4, dtype=torch.int64)) for i in range(300)]
    together = aa.box_anchor_stats(torch.from_numpy(boxes), hw, layout, 0.5, index)
    for best, num_fg, _, kept in (tuple(torch.cat(p) for p in zip(*alone)), together):
        torch.testing.assert_close(best, torch.cat([b for b, _, _ in reference]), rtol=0,
                                   atol=1e-6)
        assert num_fg.tolist() == ref_fg
        wrong = sum(a != b for a, b in zip(kept.view(300, 4).tolist(),
                                           torch.tensor(ref_kept).view(300, 4).tolist()))
        assert wrong == 0, f"kept_fg differs from the Matcher's on {wrong} of 300 images"
    # Neighbours took anchors from 290 of the 1200 boxes (718 have foreground anchors on two
    # levels); before anchor keys spanned all levels, 24 images disagreed alone, 31 together.
    assert (torch.tensor(ref_kept) < torch.tensor(ref_fg)).sum() > 200


def test_grid_sizes_equal_backbone_feature_maps():
    """The layout's feature-map sizes are the backbone's on a padded 200x249 image: the demo's
    MobileNetV2-FPN (padded to 128) and a ResNet-18 C4 trunk (no padding, sizes by ceil)."""
    demo = get_cfg()
    add_retinanet_plugin_config(demo)
    demo.merge_from_file(f"{CONFIGS}/demo_deepforest_mobilenet_v2_fpn.yaml")
    c4 = _cfg()
    c4.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    c4.MODEL.RESNETS.DEPTH = 18
    c4.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    c4.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    c4.MODEL.RETINANET.IN_FEATURES = ["res4"]
    c4.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64]]
    for cfg in (demo, c4):
        shapes, divisibility, square = aa.backbone_shapes(cfg)
        layout = aa.anchor_layout(cfg, shapes, divisibility, square)
        backbone = build_backbone(aa.layout._backbone_cfg(cfg)).eval()
        images = ImageList.from_tensors([torch.zeros(3, 200, 249)], backbone.size_divisibility)
        with torch.no_grad():
            feats = backbone(images.tensor)
        expected = [tuple(feats[f].shape[-2:]) for f in cfg.MODEL.RETINANET.IN_FEATURES]
        assert layout.grid_sizes(200, 249) == expected
    # C4: 200 -> 100 (stem) -> 50 (pool) -> 25 -> 13; 249 -> 125 -> 63 -> 32 -> 16 = ceil(249/16)
    assert expected == [(13, 16)]


# ---------------------------------------------------------------------------------------------
# Hand-computed coverage
# ---------------------------------------------------------------------------------------------


def test_boxes_equal_to_anchors_are_all_covered():
    height, width = 256, 320
    cfg = _cfg(min_size=(height,), max_size=width)
    layout = _layout(cfg)
    anchors = _full_grid(cfg, layout, height, width).tensor.numpy()
    inside = anchors[(anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= width)
                     & (anchors[:, 3] <= height)]
    assert len(inside) > 1000
    cov = aa.measure_coverage(_box_set(inside, height, width), cfg, layout, [height])
    assert cov.foreground.all()
    assert (cov.best_iou == 1.0).all()
    table = aa.coverage_tables(cov)["summary"]
    assert table["foreground_pct"] == 100.0 and table["uncovered_pct"] == 0.0


def test_foreground_count_golden():
    """One 32x32 anchor per location, box = the P3 anchor at (96, 96). Same-size anchors one
    stride (8 px) away along one axis: IoU = 24*32 / (2*1024 - 768) = 0.6 >= 0.5 (4 of them);
    diagonally: 24*24 / (2048 - 576) = 0.39; 16 px away: 512 / 1536 = 0.33. P4's 64x64 anchor at
    the same centre: 1024 / 4096 = 0.25. So 1 + 4 = 5 foreground anchors."""
    cfg = _cfg(sizes=[[32], [64], [128], [256], [512]], ratios=[[1.0]], min_size=(256,),
               max_size=320)
    cov = aa.measure_coverage(_box_set([[80, 80, 112, 112]], 256, 320), cfg, _layout(cfg), [256])
    assert cov.num_fg.tolist() == [5]
    assert cov.best_iou.tolist() == [1.0]
    assert cov.best_level.tolist() == [0]


@pytest.mark.parametrize("low_quality", [True, False])
def test_boxes_far_below_smallest_anchor_get_no_foreground(low_quality):
    """4x4 boxes against 32x32 and larger anchors: IoU <= 16 / 1024 < 0.5 for every anchor."""
    height, width = 256, 320
    cfg = _cfg(min_size=(height,), max_size=width, low_quality=low_quality)
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 250, (200, 2))
    cov = aa.measure_coverage(_box_set(np.hstack([xy, xy + 4]), height, width), cfg,
                              _layout(cfg), [height])
    assert not cov.foreground.any()
    assert (cov.best_iou <= 16 / 1024 + 1e-7).all() and (cov.best_iou > 0).all()
    row = aa.coverage_tables(cov)["by_area"][0]
    assert row["bucket"].startswith("small") and row["boxes"] == 200
    assert row["foreground_pct"] == 0.0
    assert row["low_quality_only_pct"] == (100.0 if low_quality else 0.0)
    assert row["uncovered_pct"] == (0.0 if low_quality else 100.0)
    # All 200 lack a foreground anchor and are under 21.8 px (2.7 strides of 8).
    assert aa.too_small_for_grid(cov, 8) == {"finest_stride": 8, "side_px": 21.8,
                                             "uncovered": 200, "smaller": 200}


def test_training_resize_thresholds_and_sizes():
    # 300x500, short 600, max 800: 600x1000 exceeds 800, so x0.8 -> 480x800 (ResizeShortestEdge);
    # x scales by 800/500 = 1.6, y by 480/300 = 1.6.
    box_set = aa.BoxSet(np.array([[10.0, 20.0, 110.0, 70.0]]), np.array([[300, 500]]), 1)
    boxes, hw = aa.resize_boxes(box_set, 600, 800)
    assert hw.tolist() == [[480, 800]]
    np.testing.assert_allclose(boxes, [[16, 32, 176, 112]])
    np.testing.assert_allclose(boxes, ResizeTransform(300, 500, 480, 800).apply_box(box_set.boxes))

    cfg = _cfg(min_size=(640, 672, 800))
    assert aa.training_short_edges(cfg) == [640, 672, 800]
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "range"
    cfg.INPUT.MIN_SIZE_TRAIN = (600, 1000)
    assert aa.training_short_edges(cfg) == [600, 700, 800, 900, 1000]
    assert aa.matcher_thresholds(cfg) == (0.5, 0.4)
    cfg.MODEL.RETINANET.IOU_THRESHOLDS = [0.5]
    cfg.MODEL.RETINANET.IOU_LABELS = [0, 1]
    assert aa.matcher_thresholds(cfg) == (0.5, 0.5)
    cfg.MODEL.RETINANET.IOU_LABELS = [0, -1, 1]
    with pytest.raises(ValueError, match="IOU_LABELS has 3 labels for 1 IOU_THRESHOLDS"):
        aa.matcher_thresholds(cfg)


def test_boxes_from_dicts_drops_crowd_and_empty():
    dicts = [{"file_name": "a.png", "height": 100, "width": 200, "annotations": [
        {"bbox": [10, 10, 20, 30], "bbox_mode": BoxMode.XYWH_ABS},
        {"bbox": [10, 10, 20, 30], "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": 1},
        {"bbox": [10, 10, 0, 30], "bbox_mode": BoxMode.XYWH_ABS},
    ]}, {"file_name": "b.png", "height": 50, "width": 60, "annotations": []}]
    box_set = aa.boxes_from_dicts(dicts)
    assert box_set.boxes.tolist() == [[10, 10, 30, 40]]
    assert box_set.image_hw.tolist() == [[100, 200]]
    assert (box_set.num_images, box_set.skipped_crowd, box_set.skipped_empty) == (2, 1, 1)


# ---------------------------------------------------------------------------------------------
# Proposal
# ---------------------------------------------------------------------------------------------


def _propose(cfg, box_set, short):
    return aa.propose_anchors(box_set, cfg, SHAPES, 128, [short], max_search_pairs=400)


def test_proposal_covers_tiny_boxes():
    """14-20 px boxes, anchors from 32 px (IoU <= 20^2 / 32^2 = 0.39): nothing covered; the
    proposal scales every size by one factor (each level keeps its three scales per octave) and
    covers almost all of them."""
    height, width = 256, 320
    cfg = _cfg(min_size=(height,), max_size=width)
    rng = np.random.default_rng(3)
    side = rng.uniform(14, 20, (300, 1))
    xy = rng.uniform(0, 240, (300, 2))
    box_set = _box_set(np.hstack([xy, xy + side]), height, width)
    before = aa.measure_coverage(box_set, cfg, _layout(cfg), [height])
    assert not before.foreground.any()
    proposal = _propose(cfg, box_set, height)
    assert proposal.improved
    assert proposal.coverage.foreground.mean() > 0.9
    old = np.array(cfg.MODEL.ANCHOR_GENERATOR.SIZES)
    new = np.array(proposal.sizes)
    assert new.shape == old.shape
    factor = new / old
    np.testing.assert_allclose(factor, factor[0, 0], rtol=2e-3)
    assert factor[0, 0] < 0.5
    assert len(proposal.aspect_ratios[0]) == 3
    # The proposed config lines measure what the proposal says they cover.
    cfg2 = cfg.clone()
    for line in proposal.config_lines():
        key, value = line.split(" ", 1)
        cfg2.merge_from_list([key, value])
    again = aa.measure_coverage(box_set, cfg2, _layout(cfg2), [height])
    assert again.objective() == proposal.coverage.objective()


def test_proposal_never_covers_fewer_boxes():
    height, width = 256, 320
    cfg = _cfg(min_size=(height,), max_size=width)
    layout = _layout(cfg)
    rng = np.random.default_rng(4)
    box_set = _box_set(_random_boxes(rng, 150, height, width), height, width)
    before = aa.measure_coverage(box_set, cfg, layout, [height])
    proposal = _propose(cfg, box_set, height)
    assert proposal.coverage.objective() >= before.objective()
    # Boxes equal to anchors: nothing beats the config, which is proposed unchanged.
    anchors = _full_grid(cfg, layout, height, width).tensor.numpy()[::7]
    anchors = anchors[(anchors[:, :2] >= 0).all(1) & (anchors[:, 2] <= width)
                      & (anchors[:, 3] <= height)]
    proposal = _propose(cfg, _box_set(anchors, height, width), height)
    assert not proposal.improved
    assert proposal.sizes == cfg.MODEL.ANCHOR_GENERATOR.SIZES
    assert proposal.coverage.foreground.all()


# ---------------------------------------------------------------------------------------------
# Command line on the demo data
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory):
    """Real tree crowns: the demo's two small training images (OSBS_029, SOAP_061; 98 crowns in
    two 400x400 tiles), converted as the demo converts them. The third, a 15 MB image, is left
    out to keep the test fast."""
    root = tmp_path_factory.mktemp("deepforest_anchors")
    raw = fetch_deepforest()
    sources = [(raw / f"{stem}.xml", raw / f"{stem}.png") for stem in ("OSBS_029", "SOAP_061")]
    convert_voc_to_coco(sources, root, "train",
                        class_map={"Tree": "Tree", "Alive": "Tree", "Dead": "Tree"})
    return root / "train.json"


def test_cli_on_demo_data(demo_json, tmp_path, capsys):
    config = f"{CONFIGS}/demo_deepforest_mobilenet_v2_fpn.yaml"
    out = tmp_path / "out"
    report = analyze_anchors.main(["--config-file", config, "--dataset", str(demo_json),
                                   "--output", str(out), "--search-pairs", "200"])
    printed = capsys.readouterr().out
    saved = json.loads((out / "anchor_report.json").read_text())
    assert saved["coverage"] == report["coverage"]
    coco = json.loads(demo_json.read_text())
    assert saved["boxes"] == len(coco["annotations"]) > 50
    assert saved["images"] == len(coco["images"])

    # Every tile is 400x400 and trains at 400: the per-box figures equal detectron2's full grid.
    assert {(i["height"], i["width"]) for i in coco["images"]} == {(400, 400)}
    cfg = analyze_anchors.setup_cfg(config, [])
    # MobileNetV2-FPN: p3-p7 at strides 8-128, padded to 128 (its feature maps are compared with
    # the layout's in test_grid_sizes_equal_backbone_feature_maps).
    assert saved["anchors"]["strides"] == list(STRIDES)
    layout = _layout(cfg, 128)
    boxes = np.array([BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
                      for a in coco["annotations"]])
    best, num_fg = _brute_force(cfg, layout, boxes, 400, 400)
    summary = saved["coverage"]["summary"]
    assert summary["boxes"] == len(boxes)
    assert summary["foreground_pct"] == round(100 * float((num_fg > 0).float().mean()), 2)
    assert summary["median_best_iou"] == round(float(np.median(best.numpy())), 4)
    assert sum(saved["coverage"]["fg_anchors_per_box"].values()) == len(boxes)
    assert saved["coverage"]["fg_anchors_per_box"]["0"] == int((num_fg == 0).sum())
    assert sum(r["boxes"] for r in saved["coverage"]["by_area"]) == len(boxes)
    assert list(saved["coverage"]["best_level"]) == ["p3", "p4", "p5", "p6", "p7"]

    # 0.5 * 8 / (1 - sqrt(2 * 0.5 / 1.5)) = 4 / 0.1835 = 21.8 px: same-size anchor half a stride
    # off along both axes, IoU (21.8 - 4)^2 / (2 * 21.8^2 - 17.8^2) = 0.5.
    tiny = saved["too_small_for_grid"]
    assert tiny["side_px"] == 21.8 and tiny["finest_stride"] == 8
    assert tiny["uncovered"] == int((num_fg == 0).sum())  # the config's own uncovered boxes
    assert 0 <= tiny["smaller"] <= tiny["uncovered"]
    proposal = saved["proposal"]
    assert proposal["coverage"]["summary"]["foreground_pct"] >= summary["foreground_pct"]
    # The verdict opens the output; every change tried is listed with its measured coverage,
    # and the words of those that gain the margin are printed as a shell reads them.
    assert printed.splitlines()[0] == saved["verdict"]
    assert saved["advice"], "the crowns under 21.8 px make the finer level worth trying"
    for entry in saved["advice"]:
        assert f"- {entry['title']}: {summary['foreground_pct']:.2f}% -> " \
               f"{entry['foreground_pct']:.2f}%" in printed
        block = "".join(f"    {line}\n" for line in shell_lines(entry["arguments"], "yaml"))
        assert (block in printed) == entry["helps"]
        assert entry["helps"] == (entry["gain_points"] >= saved["min_gain"])
    picture = cv2.imread(str(out / "best_iou_histogram.png"))
    assert picture is not None and picture.shape[0] > 100 and picture.std() > 0


def test_command_line_module_keeps_the_api():
    """Scripts that imported the analysis from the command-line module (benchmarks/) get the
    package's own functions, not copies."""
    for name in aa.__all__:
        assert getattr(analyze_anchors, name) is getattr(aa, name), name


def test_unknown_dataset_is_named():
    with pytest.raises(KeyError, match="'no_such_set' is not registered"):
        aa.load_dataset_dicts("no_such_set")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        aa.load_dataset_dicts("missing.json")


def test_config_errors_name_the_key():
    cfg = _cfg()
    cfg.MODEL.RETINANET.IN_FEATURES = ["p3", "p9"]
    with pytest.raises(ValueError, match=r"IN_FEATURES names \['p9'\]"):
        _layout(cfg)
    cfg = _cfg()
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "range"
    cfg.INPUT.MIN_SIZE_TRAIN = (600, 700, 800)
    with pytest.raises(ValueError, match="MIN_SIZE_TRAIN"):
        aa.training_short_edges(cfg)
    cfg = _cfg()
    cfg.MODEL.RETINANET.IOU_LABELS = [1, -1, 0]
    with pytest.raises(ValueError, match="must end with 1"):
        aa.matcher_thresholds(cfg)


def test_two_stage_config_uses_the_rpn_keys():
    """Faster R-CNN with FocalRPN: anchors on the RPN's P2-P6, matched with MODEL.RPN's
    thresholds (background < 0.3, foreground >= 0.7) and always low-quality matches."""
    cfg = get_cfg()
    add_retinanet_plugin_config(cfg)
    cfg.merge_from_file(f"{CONFIGS}/faster_rcnn_focal_rpn_R_50_FPN_1x.yaml")
    cfg.MODEL.RETINANET.ALLOW_LOW_QUALITY_MATCHES = False  # not read by the RPN
    assert aa.anchor_head_key(cfg) == "MODEL.RPN"
    assert aa.matcher_thresholds(cfg) == (0.7, 0.3)
    assert aa.allow_low_quality_matches(cfg)
    shapes = {f"p{i + 2}": ShapeSpec(channels=8, stride=2 ** (i + 2)) for i in range(5)}
    layout = aa.anchor_layout(cfg, shapes, 32)
    assert layout.strides == [4, 8, 16, 32, 64]
    assert [len(c) for c in layout.cell_anchors] == [3] * 5  # one size x 3 ratios per level
    # A 32x32 box on a P2 anchor (stride 4): same-size anchors 4 px away along one axis have
    # IoU 28*32 / (2048 - 896) = 0.78 >= 0.7 (4 of them); 8 px away 0.6, diagonal 4 px 0.62.
    # Trained at short edge 256, the 256x320 image keeps its size; ratio-0.5/2 anchors reach
    # 32*22.6 / (2048 - 724) = 0.55, P3 64 px anchors 0.25.
    cov = aa.measure_coverage(_box_set([[80, 80, 112, 112]], 256, 320), cfg, layout, [256])
    assert cov.num_fg.tolist() == [5] and cov.best_iou.tolist() == [1.0]


# ---------------------------------------------------------------------------------------------
# Verdict, advice as override words, per-class coverage: golden hand-made datasets
# ---------------------------------------------------------------------------------------------

# The demo's anchors (16-406 px on P3-P7, strides 8-128, ratios 0.5 / 1 / 2, offset 0, so
# anchors are centred on multiples of the stride), its 400x400 tiles trained at 400 (no resize).
DEMO = f"{CONFIGS}/demo_deepforest_mobilenet_v2_fpn.yaml"
DEMO_OPTS = ["MODEL.MOBILENET.PRETRAINED", "False"]


def _coco_json(path, boxes, categories=((1, "object"),)):
    """One 400x400 image holding ``boxes``: (x0, y0, side_w, side_h[, category_id]) rows."""
    annotations = [{"id": i + 1, "image_id": 1, "bbox": [float(v) for v in b[:4]],
                    "category_id": int(b[4]) if len(b) > 4 else categories[0][0],
                    "area": float(b[2] * b[3]), "iscrowd": 0} for i, b in enumerate(boxes)]
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "height": 400, "width": 400}],
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in categories],
    }))
    return str(path)


def _centred(side, centres):
    """Square boxes of ``side`` px centred on ``centres`` (x, y)."""
    return [(x - side / 2, y - side / 2, side, side) for x, y in centres]


def _run(dataset, tmp_path, capsys, *extra):
    report = analyze_anchors.main(["--config-file", DEMO, "--dataset", dataset, "--output",
                                   str(tmp_path / "out"), "--search-pairs", "400", *extra,
                                   *DEMO_OPTS])
    return report, capsys.readouterr().out


def _advised_words(printed):
    """The override words printed under the ADVISED change, as a shell reads them."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(": ADVISED")) + 2
    block = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        block.append(line.strip().rstrip("\\"))
    return shlex.split(" ".join(block))


def test_verdict_anchors_fit(tmp_path, capsys):
    """Boxes equal to the demo's 16 px (P3) and 32 px (P4) square anchors, centred on their
    grid points: every best IoU is 1, so nothing can cover more boxes or fit them better."""
    boxes = _centred(16, [(8 * i, 8 * j) for i in range(10, 40, 4) for j in (16, 24)])
    boxes += _centred(32, [(16 * i, 16 * j) for i in range(3, 23, 2) for j in (15, 20)])
    report, printed = _run(_coco_json(tmp_path / "fit.json", boxes), tmp_path, capsys)
    assert report["coverage"]["summary"]["foreground_pct"] == 100.0
    assert report["advised"] is None and report["advice"] == []
    assert printed.splitlines()[0] == report["verdict"] == (
        "anchors fit: 100.00% of boxes have a foreground anchor; no change needed (no change "
        "found to try; --min-gain 1)")
    assert "keys, after" not in printed
    assert set(report["not_tried"]) == {"anchors", "finer level", "coarser level"}


def test_verdict_names_the_finer_level_keys_and_they_merge(tmp_path, capsys):
    """10x10 boxes centred half a stride (4 px) off the P3 grid along both axes: the best P3
    anchor (16 px, 4 px off) reaches 9 * 9 / (100 + 256 - 81) = 0.29, and no anchor of any
    size at stride 8 reaches 0.5 (a square anchor of side a: (1 + a/2)^2 / (100 + a^2 -
    (1 + a/2)^2) <= 0.29 for a <= 18, 100 / a^2 < 0.31 above). One level finer with the sizes
    halved puts 10.08 px anchors on the stride-4 grid, concentric with the boxes:
    100 / 10.08^2 = 0.98. Coverage 0% -> 100%; the printed words, merged through the
    project's config loading, give the printed figure."""
    boxes = _centred(10, [(8 * i + 4, 8 * j + 4) for i in range(5, 45, 3) for j in (10, 20, 30)])
    dataset = _coco_json(tmp_path / "tiny.json", boxes)
    report, printed = _run(dataset, tmp_path, capsys)
    assert report["coverage"]["summary"]["foreground_pct"] == 0.0
    assert report["too_small_for_grid"]["smaller"] == len(boxes)
    advised = report["advice"][report["advised"]]
    assert advised["kind"] == "finer level"
    assert list(advised["changes"]) == ["MODEL.FPN.IN_FEATURES", "MODEL.RETINANET.IN_FEATURES",
                                        "MODEL.ANCHOR_GENERATOR.SIZES"]
    assert advised["foreground_pct"] == 100.0 and advised["gain_points"] == 100.0
    # The price, printed with it: 400x400 padded to 416 (MobileNetV2-FPN pads to 32), 9 anchors
    # a position. P3-P7: 52^2 + 26^2 + 13^2 + 7^2 + 4^2 = 3614 positions, 32526 anchors; P2-P6:
    # 104^2 + 52^2 + 26^2 + 13^2 + 7^2 = 14414 positions, 129726 anchors.
    assert report["anchors_per_image"] == {"image_hw": [400, 400], "count": 32526}
    assert advised["anchors_per_image"] == 129726
    assert "anchors per 400x400 image 32,526 -> 129,726: ADVISED" in printed
    assert printed.splitlines()[0] == report["verdict"] == (
        "change the config: one level finer (p2-p6), anchor sizes x 0.5 gives 0.00% -> 100.00% "
        "of boxes with a foreground anchor (+100.00 points >= --min-gain 1); keys: "
        "MODEL.FPN.IN_FEATURES, MODEL.RETINANET.IN_FEATURES, MODEL.ANCHOR_GENERATOR.SIZES")
    words = _advised_words(printed)
    assert words[::2] == list(advised["changes"])
    cfg = analyze_anchors.setup_cfg(DEMO, DEMO_OPTS + words)
    assert list(cfg.MODEL.FPN.IN_FEATURES) == ["res2", "res3", "res4", "res5"]
    again, _, _ = aa.analyze(cfg, [dataset], propose=False)
    assert again["coverage"] == advised["coverage"]
    assert again["anchors"]["strides"] == [4, 8, 16, 32, 64]
    assert again["anchors"]["sizes"][0] == [8.0, 10.08, 12.7]  # 16, 20.16, 25.4 halved


def test_no_change_under_the_margin_says_why(tmp_path, capsys):
    """199 boxes equal to 16 px P3 anchors (IoU 1) and one 11x11 box on a grid point: IoU with
    the 16 px anchor 121 / 256 = 0.47, uncovered. Anchors scaled by f in [0.71, 0.97] cover it
    too ((11 / 16f)^2 >= 0.5) and keep the others (f^2 >= 0.5); one level finer gives it a
    concentric 10.08 px anchor (0.84). Either gains 1 box of 200 = 0.5 points, under the
    default margin of 1; with --min-gain 0.5 one is advised and its keys printed."""
    centres = [(16 * i + 8, 16 * j + 8) for i in range(1, 24) for j in range(1, 24)][:199]
    boxes = _centred(16, centres) + _centred(11, [(200, 200)])
    dataset = _coco_json(tmp_path / "margin.json", boxes)
    report, printed = _run(dataset, tmp_path, capsys)
    assert report["coverage"]["summary"]["foreground_pct"] == 99.5  # 199 / 200
    gains = {a["kind"]: a["gain_points"] for a in report["advice"]}
    assert gains["anchors"] == 0.5 and max(gains.values()) == 0.5
    assert report["advised"] is None
    assert report["verdict"].startswith(
        "anchors fit: 99.50% of boxes have a foreground anchor; no change needed (the best of "
        f"{len(report['advice'])} changes tried gains +0.50 points; --min-gain 1)")
    assert "keys, after" not in printed and "MODEL.ANCHOR_GENERATOR.SIZES" not in printed
    assert "the proposed anchor sizes and aspect ratios: 99.50% -> 100.00% (+0.50 points)" \
        in printed
    assert printed.count("not advised, under --min-gain 1") == sum(
        a["gain_points"] < 1 for a in report["advice"])

    report, printed = _run(dataset, tmp_path, capsys, "--min-gain", "0.5")
    assert report["advice"][report["advised"]]["gain_points"] == 0.5
    assert report["verdict"].startswith("change the config:") and "keys, after" in printed


def test_per_class_coverage_counts(tmp_path, capsys):
    """Class "big" (id 7): 30 boxes equal to 32 px P4 anchors, IoU 1. Class "tiny" (id 9): 10
    boxes of 4x4 centred on a P3 grid point, best IoU 16 / 256 = 0.0625 with the 16 px anchor.
    Class "unused" (id 3) has no box; its row says 0."""
    big = [(*b, 7) for b in _centred(32, [(16 * i, 16 * j) for i in range(3, 23, 2)
                                          for j in (5, 12, 20)])]
    tiny = [(*b, 9) for b in _centred(4, [(8 * i, 320) for i in range(10, 40, 3)])]
    dataset = _coco_json(tmp_path / "two.json", big + tiny,
                         categories=((3, "unused"), (7, "big"), (9, "tiny")))
    report, printed = _run(dataset, tmp_path, capsys, "--no-proposal")
    rows = {r["bucket"]: r for r in report["coverage"]["by_class"]}
    assert [r["bucket"] for r in report["coverage"]["by_class"]] == ["unused", "big", "tiny"]
    assert (rows["big"]["boxes"], rows["big"]["foreground_pct"],
            rows["big"]["median_best_iou"]) == (30, 100.0, 1.0)
    assert (rows["tiny"]["boxes"], rows["tiny"]["foreground_pct"],
            rows["tiny"]["median_best_iou"]) == (10, 0.0, 0.0625)
    assert rows["unused"]["boxes"] == 0
    assert report["coverage"]["summary"]["foreground_pct"] == 75.0  # 30 / 40
    assert re.search(r"^class +boxes +fg % .* med IoU", printed, re.M)
    assert re.search(r"^big +30 +100\.00 +0\.00 +0\.00 +1\.000 ", printed, re.M)
    assert re.search(r"^tiny +10 +0\.00 +100\.00 +0\.00 +0\.062 ", printed, re.M)
    assert report["verdict"] == ("75.00% of boxes have a foreground anchor (--no-proposal: no "
                                 "change tried)")


def test_verdict_prefers_the_cheaper_change_unless_a_costlier_gains_the_margin_more():
    """200 boxes, none covered. A change covering 10 of them gains 100 * 10 / 200 = 5 points;
    one covering 11, 5.5 points; 12, 6 points. With --min-gain 1: the cheap change (30k anchors
    per image) beats a costlier one (120k) gaining 5.5 (< 5 + 1), not one gaining 6 (>= 5 + 1);
    equal costs go to the larger gain. With none over the margin, the line says why."""

    def cov(covered):
        n = np.zeros(200, dtype=np.int64)
        n[:covered] = 3
        ones = np.ones(200)
        return aa.Coverage(ones, ones, ones * 0.3, n, n * 0, ones, n, 0.5, True)

    def advice(title, covered, anchors):
        return aa.Advice("x", title, {}, [], coverage=cov(covered),
                         extra={"anchors_per_image": anchors})

    cheap, close, far = (advice("cheap", 10, 30000), advice("close", 11, 120000),
                         advice("far", 12, 120000))
    assert aa.verdict(cov(0), [close, cheap], 1.0)["advised"] == 1
    assert aa.verdict(cov(0), [close, cheap, far], 1.0)["advised"] == 2
    assert aa.verdict(cov(0), [close, far], 1.0)["advised"] == 1
    # Under the margin: "anchors fit" only when fewer boxes than the margin lack an anchor.
    assert aa.verdict(cov(0), [cheap], 6.0)["line"] == (
        "no change advised: 0.00% of boxes have a foreground anchor, but the best of 1 changes "
        "tried gains +5.00 points, under --min-gain 6")
    assert aa.verdict(cov(199), [], 1.0)["line"] == (
        "anchors fit: 99.50% of boxes have a foreground anchor; no change needed (no change "
        "found to try; --min-gain 1)")
