"""DeepForest fetch, VOC -> tiled COCO conversion, validation and detectron2 registration.

The real data comes from the pinned ``deepforest==2.1.0`` wheel, fetched once into the dataset
cache (``$DETECTRON2_DATASETS/deepforest/raw``) and converted once per session into a temporary
directory. Bad-input cases use small files built in ``tmp_path``.
"""

import json
import subprocess
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from retinanet_plugin.data import deepforest
from retinanet_plugin.data.coco_check import validate_coco_json
from retinanet_plugin.data.deepforest import (
    DATASET_NAMES,
    fetch_deepforest,
    prepare_deepforest,
    register_deepforest,
)
from retinanet_plugin.data.tiling import convert_voc_to_coco
from retinanet_plugin.data.wheel_fetch import fetch_from_wheel, sha256_of

YELL_TRAIN = "2019_YELL_2_528000_4978000_image_crop2"
YELL_VAL = "2019_YELL_2_541000_4977000_image_crop"


@pytest.fixture(scope="session")
def raw_dir():
    return fetch_deepforest()


@pytest.fixture(scope="session")
def dataset(raw_dir, tmp_path_factory):
    """(root, stats) of one conversion with the default tiling (400 px tiles, 100 px overlap)."""
    root = tmp_path_factory.mktemp("deepforest")
    # Point raw/ at the shared cache, so the session converts without downloading again.
    (root / "raw").symlink_to(raw_dir.resolve(), target_is_directory=True)
    return root, prepare_deepforest(root)


def _load(root, split):
    return json.loads((root / f"{split}.json").read_text())


def _voc_boxes(xml_path):
    """(name, (xmin, ymin, xmax, ymax)) for every <object>, read independently of the code."""
    objects = ET.parse(xml_path).getroot().iter("object")
    return [
        (
            o.findtext("name"),
            tuple(float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")),
        )
        for o in objects
    ]


# ---------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------


def test_raw_files_are_the_pinned_ones(raw_dir):
    names = sorted(p.name for p in raw_dir.iterdir())
    assert names == sorted(deepforest._MEMBER_SHA256)
    for name, sha in deepforest._MEMBER_SHA256.items():
        assert sha256_of(raw_dir / name) == sha
    classes = Counter(n for xml in raw_dir.glob("*.xml") for n, _ in _voc_boxes(xml))
    # 574 + 279 + 61 Tree in three images; SOAP_061 holds the only Alive/Dead boxes.
    assert classes == {"Tree": 574 + 279 + 61, "Alive": 9, "Dead": 28}
    assert sum(classes.values()) == 951


def test_fetch_is_idempotent_without_network(raw_dir, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("a verified cache must not run pip")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert fetch_deepforest(raw_dir) == raw_dir


def test_counts_per_split(dataset):
    root, stats = dataset
    assert stats["train"] == {
        "source_images": 3,
        "source_boxes": 574 + 61 + 37,
        # YELL crop2 is 2299x2472: x origins 0, 300, ..., 1800 and 1899 (8), y origins
        # 0, 300, ..., 1800 and 2072 (8); OSBS_029 and SOAP_061 are one 400x400 tile each.
        "images": 8 * 8 + 1 + 1,
        # Tiles of YELL crop2 at (0, 0), (0, 600), (0, 900) hold no tree.
        "empty_images": 3,
        # Measured: overlapping tiles repeat boxes, so more than the 672 source boxes.
        "boxes": 1139,
    }
    assert stats["val"] == {
        "source_images": 1,
        "source_boxes": 279,
        # 1249x1035: x origins 0, 300, 600, 849; y origins 0, 300, 600, 635.
        "images": 4 * 4,
        "empty_images": 0,
        "boxes": 546,  # measured
    }
    for split in ("train", "val"):
        coco = validate_coco_json(root / f"{split}.json", root / "images")
        assert len(coco["images"]) == stats[split]["images"]
        assert len(coco["annotations"]) == stats[split]["boxes"]
        assert all((root / "images" / img["file_name"]).is_file() for img in coco["images"])


def test_split_is_by_source_image(dataset):
    root, _ = dataset
    sources = {
        s: {img["source_image"] for img in _load(root, s)["images"]} for s in ("train", "val")
    }
    assert sources["val"] == {YELL_VAL + ".png"}
    assert sources["train"] == {YELL_TRAIN + ".png", "OSBS_029.png", "SOAP_061.png"}


def test_every_source_box_survives_in_some_tile(dataset):
    # Overlap (100 px) is close to the largest crown (108 px): no tree may be lost to tiling.
    root, stats = dataset
    for split in ("train", "val"):
        coco = _load(root, split)
        source = {img["id"]: img["source_image"] for img in coco["images"]}
        kept = {(source[a["image_id"]], a["source_object"]) for a in coco["annotations"]}
        assert len(kept) == stats[split]["source_boxes"]


def test_boxes_match_voc_source_after_tile_offset(dataset, raw_dir):
    root, _ = dataset
    coco = _load(root, "train")
    by_name = {img["file_name"]: img for img in coco["images"]}

    def boxes_in(file_name):
        image_id = by_name[file_name]["id"]
        return {a["source_object"]: a for a in coco["annotations"] if a["image_id"] == image_id}

    voc = _voc_boxes(raw_dir / f"{YELL_TRAIN}.xml")
    # object[0] is (681, 369, 699, 386): in the tile at x=300, y=0 it starts at 681 - 300 = 381.
    assert voc[0] == ("Tree", (681.0, 369.0, 699.0, 386.0))
    assert boxes_in(f"{YELL_TRAIN}_x300_y0.png")[0]["bbox"] == [381.0, 369.0, 18.0, 17.0]
    # ... and at x=600, y=300 it starts at (681 - 600, 369 - 300) = (81, 69).
    assert boxes_in(f"{YELL_TRAIN}_x600_y300.png")[0]["bbox"] == [81.0, 69.0, 18.0, 17.0]

    # object[419] crosses the right edge (x = 1000) of the tile at x=600, y=0: clipped there.
    name, (x0, y0, x1, y1) = voc[419]
    assert x0 < 1000 < x1
    clipped = boxes_in(f"{YELL_TRAIN}_x600_y0.png")[419]
    assert clipped["bbox"] == [x0 - 600, y0, 1000 - x0, y1 - y0]
    assert clipped["area"] == (1000 - x0) * (y1 - y0)
    assert (1000 - x0) / (x1 - x0) >= 0.5  # kept because at least half of it is visible

    # SOAP_061 is one tile at the origin: boxes are the VOC ones in XYWH, names kept.
    soap = boxes_in("SOAP_061_x0_y0.png")
    for index, (name, (x0, y0, x1, y1)) in enumerate(_voc_boxes(raw_dir / "SOAP_061.xml")):
        assert soap[index]["bbox"] == [x0, y0, x1 - x0, y1 - y0]
        assert soap[index]["source_class"] == name
        assert soap[index]["category_id"] == 1  # Alive and Dead merged into Tree


def test_boxes_with_too_little_left_are_dropped(dataset, raw_dir):
    # Every (tile, VOC box) pair: present in the tile iff >= 50% of the box is inside it.
    root, _ = dataset
    coco = _load(root, "val")
    voc = _voc_boxes(raw_dir / f"{YELL_VAL}.xml")
    present = {(a["image_id"], a["source_object"]) for a in coco["annotations"]}
    for img in coco["images"]:
        tx, ty = img["tile_origin"]
        for index, (_, (x0, y0, x1, y1)) in enumerate(voc):
            w = min(x1, tx + img["width"]) - max(x0, tx)
            h = min(y1, ty + img["height"]) - max(y0, ty)
            visible = w >= 1 and h >= 1 and w * h >= 0.5 * (x1 - x0) * (y1 - y0)
            assert ((img["id"], index) in present) == visible


def test_categories_and_empty_tiles(dataset):
    root, _ = dataset
    coco = _load(root, "train")
    assert coco["categories"] == [{"id": 1, "name": "Tree", "supercategory": "Tree"}]
    with_boxes = {a["image_id"] for a in coco["annotations"]}
    empty = sorted(img["file_name"] for img in coco["images"] if img["id"] not in with_boxes)
    assert empty == [
        f"{YELL_TRAIN}_x0_y0.png",
        f"{YELL_TRAIN}_x0_y600.png",
        f"{YELL_TRAIN}_x0_y900.png",
    ]
    tile = cv2.imread(str(root / "images" / empty[0]))
    assert tile.shape == (400, 400, 3)


def test_pycocotools_scores_ground_truth_as_perfect(dataset):
    # COCOEvaluator reads the JSON with pycocotools: ground truth as detections gives AP 1.
    root, _ = dataset
    gt = COCO(str(root / "val.json"))
    dets = [dict(a, score=1.0) for a in gt.dataset["annotations"]]
    evaluator = COCOeval(gt, gt.loadRes(dets), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_prepare_reuses_a_matching_conversion(dataset, monkeypatch):
    root, stats = dataset

    def no_convert(*args, **kwargs):
        raise AssertionError("an up-to-date conversion must be reused")

    monkeypatch.setattr(deepforest, "convert_deepforest", no_convert)
    again = prepare_deepforest(root)
    for split in ("train", "val"):
        assert again[split] == {k: stats[split][k] for k in ("images", "empty_images", "boxes")}
    with pytest.raises(AssertionError, match="reused"):
        prepare_deepforest(root, tile_size=512)  # other parameters: converts again


def test_cli_prints_counts(dataset, capsys):
    root, _ = dataset
    deepforest.main(["--out", str(root)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["train", "66", "3", "1139"]
    assert lines[2].split() == ["val", "16", "0", "546"]


@pytest.fixture
def registered(dataset):
    root, _ = dataset
    # A test that ran train_net.py in this process with a DeepForest config (tests/test_cli.py)
    # left the sets registered at the default root; this test registers them at its own.
    for name in DATASET_NAMES.values():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    names = register_deepforest(root)
    yield root, names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_register_and_load_dicts(registered):
    root, names = registered
    assert names == ("deepforest_tree_train", "deepforest_tree_val")
    assert register_deepforest(root) == names  # second call: already registered, no error
    with pytest.raises(ValueError, match="already registered"):
        register_deepforest(root / "elsewhere")

    dicts = DatasetCatalog.get("deepforest_tree_val")
    assert len(dicts) == 16
    assert sum(len(d["annotations"]) for d in dicts) == 546
    first = dicts[0]
    assert first["file_name"] == str(root / "images" / f"{YELL_VAL}_x0_y0.png")
    assert Path(first["file_name"]).is_file()
    assert (first["height"], first["width"]) == (400, 400)
    anno = first["annotations"][0]
    assert anno["bbox_mode"] == BoxMode.XYWH_ABS
    assert anno["category_id"] == 0  # dataset id 1 -> contiguous id 0
    assert len(anno["bbox"]) == 4

    meta = MetadataCatalog.get("deepforest_tree_train")
    assert meta.thing_classes == ["Tree"]
    assert meta.evaluator_type == "coco"
    assert meta.json_file == str(root / "train.json")
    train = DatasetCatalog.get("deepforest_tree_train")
    assert len(train) == 66  # empty tiles stay in the dicts; the train loader may filter them


# ---------------------------------------------------------------------------------------------
# Tiling on a synthetic image, golden values
# ---------------------------------------------------------------------------------------------


def _write_voc(path, objects, size=(500, 300), filename="img.png", root_tag="annotation"):
    """VOC file with ``objects`` = [(name, (xmin, ymin, xmax, ymax)), ...]."""
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    path.write_text(
        f"<{root_tag}><filename>{filename}</filename><size><width>{size[0]}</width>"
        f"<height>{size[1]}</height><depth>3</depth></size>{objs}</{root_tag}>"
    )
    return path


def _write_image(path, size=(500, 300)):
    rng = np.random.default_rng(0)
    cv2.imwrite(str(path), rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return path


def test_tiling_golden_values(tmp_path):
    _write_image(tmp_path / "img.png")
    xml = _write_voc(
        tmp_path / "img.xml",
        [
            ("Tree", (140, 10, 180, 50)),  # 40x40 near the top
            ("Dead", (190, 250, 230, 290)),  # 40x40 near the bottom
        ],
    )
    out = tmp_path / "out"
    stats = convert_voc_to_coco(
        [(xml, None)],
        out,
        "train",
        class_map={"Tree": "Tree", "Dead": "Tree"},
        tile_size=200,
        overlap=50,
    )
    # 500x300, stride 150: x origins 0, 150, 300 (300 + 200 = 500 ends at the edge);
    # y origins 0 and 100 (the last shifted back to end at 300).
    assert stats == {
        "source_images": 1,
        "source_boxes": 2,
        "images": 6,
        "empty_images": 3,
        "boxes": 3,
    }
    coco = validate_coco_json(out / "train.json", out / "images")
    tiles = {img["id"]: tuple(img["tile_origin"]) for img in coco["images"]}
    got = sorted((tiles[a["image_id"]], a["source_object"], a["bbox"]) for a in coco["annotations"])
    assert got == [
        ((0, 0), 0, [140.0, 10.0, 40.0, 40.0]),  # whole
        # Box 1 in tile (0, 100): x 190..200 visible, 10 / 40 = 25% < 50%, dropped.
        ((150, 0), 0, [0.0, 10.0, 30.0, 40.0]),  # x 150..180 visible, 30 / 40 = 75%
        ((150, 100), 1, [40.0, 150.0, 40.0, 40.0]),  # (190 - 150, 250 - 100)
    ]
    assert {a["source_class"] for a in coco["annotations"]} == {"Tree", "Dead"}
    assert {img["width"] for img in coco["images"]} == {200}


def test_small_image_is_one_tile_of_its_own_size(tmp_path):
    _write_image(tmp_path / "img.png", size=(120, 90))
    xml = _write_voc(tmp_path / "img.xml", [("Tree", (0, 0, 120, 90))], size=(120, 90))
    stats = convert_voc_to_coco([(xml, None)], tmp_path / "out", "val", class_map={"Tree": "Tree"})
    coco = json.loads((tmp_path / "out" / "val.json").read_text())
    assert stats["images"] == 1
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (120, 90)
    assert coco["annotations"][0]["bbox"] == [0.0, 0.0, 120.0, 90.0]  # edge-to-edge is inside


# ---------------------------------------------------------------------------------------------
# Bad VOC input: each error names the file and the object
# ---------------------------------------------------------------------------------------------


def _convert(tmp_path, xml, image=None):
    return convert_voc_to_coco(
        [(xml, image)], tmp_path / "out", "train", class_map={"Tree": "Tree"}
    )


def test_missing_image(tmp_path):
    xml = _write_voc(tmp_path / "a.xml", [("Tree", (1, 1, 10, 10))])
    with pytest.raises(FileNotFoundError, match=r"img\.png: image not found .*a\.xml"):
        _convert(tmp_path, xml)


def test_unreadable_image(tmp_path):
    (tmp_path / "img.png").write_bytes(b"not a png")
    xml = _write_voc(tmp_path / "a.xml", [("Tree", (1, 1, 10, 10))])
    with pytest.raises(ValueError, match=r"img\.png: cannot be read as an image .*a\.xml"):
        _convert(tmp_path, xml)


@pytest.mark.parametrize(
    "text, message",
    [
        ("<annotation><object>", r"a\.xml: not a Pascal VOC annotation \(invalid XML"),
        ("<coco><images/></coco>", r"a\.xml: not a Pascal VOC annotation \(root element <coco>"),
        (
            "<annotation><object><name>Tree</name></object></annotation>",
            r"a\.xml: object\[0\] \('Tree'\) has no <bndbox>",
        ),
        (
            "<annotation><object><name>Tree</name><bndbox><xmin>a</xmin></bndbox></object>"
            "</annotation>",
            r"a\.xml: object\[0\] \('Tree'\) <xmin> is 'a', not a number",
        ),
    ],
)
def test_not_voc(tmp_path, text, message):
    _write_image(tmp_path / "img.png")
    (tmp_path / "a.xml").write_text(text)
    with pytest.raises(ValueError, match=message):
        _convert(tmp_path, tmp_path / "a.xml", tmp_path / "img.png")


@pytest.mark.parametrize(
    "box, message",
    [
        ((10, 10, 10, 20), "has zero or negative size"),
        ((30, 10, 20, 20), "has zero or negative size"),
        ((490, 10, 501, 20), "lies outside the 500x300 image img.png"),
        ((-1, 10, 20, 20), "lies outside the 500x300 image img.png"),
    ],
)
def test_bad_box(tmp_path, box, message):
    _write_image(tmp_path / "img.png")
    xml = _write_voc(tmp_path / "a.xml", [("Tree", (1, 1, 5, 5)), ("Tree", box)])
    with pytest.raises(ValueError, match=r"a\.xml: object\[1\] \('Tree'\) box .*" + message):
        _convert(tmp_path, xml)
    assert not (tmp_path / "out" / "train.json").exists()


def test_unknown_class(tmp_path):
    _write_image(tmp_path / "img.png")
    xml = _write_voc(tmp_path / "a.xml", [("Tree", (1, 1, 5, 5)), ("Shrub", (1, 1, 5, 5))])
    with pytest.raises(ValueError, match=r"a\.xml: object\[1\] has class 'Shrub'"):
        _convert(tmp_path, xml)


def test_size_mismatch(tmp_path):
    _write_image(tmp_path / "img.png", size=(500, 300))
    xml = _write_voc(tmp_path / "a.xml", [("Tree", (1, 1, 5, 5))], size=(300, 500))
    with pytest.raises(ValueError, match=r"a\.xml: <size> says 300x500 but .*img\.png is 500x300"):
        _convert(tmp_path, xml)


# ---------------------------------------------------------------------------------------------
# validate_coco_json
# ---------------------------------------------------------------------------------------------


def _coco(tmp_path, annotations, **overrides):
    _write_image(tmp_path / "img.png", size=(50, 40))
    coco = {
        "images": [
            {"id": 1, "file_name": "img.png", "width": 50, "height": 40},
            {"id": 2, "file_name": "img.png", "width": 50, "height": 40},
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "Tree"}],
        **overrides,
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    return path


def _ann(aid, bbox, category_id=1, image_id=1):
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": bbox}


def test_valid_coco_with_unannotated_image(tmp_path):
    # Image 2 has no annotation: a valid negative.
    coco = validate_coco_json(_coco(tmp_path, [_ann(7, [0, 0, 50, 40])]))
    assert [a["id"] for a in coco["annotations"]] == [7]


@pytest.mark.parametrize(
    "annotation, message",
    [
        (
            _ann(7, [10, 10, 0, 5]),
            r"annotation id 7 \(image id 1, img\.png\): bbox .* zero or "
            r"negative size",
        ),
        (_ann(7, [10, 10, 5, -2]), r"annotation id 7 .*zero or negative size"),
        (_ann(7, [40, 10, 11, 5]), r"annotation id 7 .*lies outside the 50x40 image"),
        (_ann(7, [10, -1, 5, 5]), r"annotation id 7 .*lies outside the 50x40 image"),
        (
            _ann(7, [10, 10, 5, 5], category_id=3),
            r"annotation id 7 .*category_id 3 not in "
            r"categories \[1\]",
        ),
        (_ann(7, [10, 10, 5, 5], image_id=9), r"annotation id 7: image_id 9 not in images"),
        (_ann(7, [10, 10, 5]), r"annotation id 7 .*bbox \[10, 10, 5\] is not \[x, y, width"),
    ],
)
def test_bad_coco_annotation(tmp_path, annotation, message):
    path = _coco(tmp_path, [_ann(1, [0, 0, 5, 5]), annotation])
    with pytest.raises(ValueError, match=r"ann\.json: " + message):
        validate_coco_json(path)


def test_coco_missing_image_file(tmp_path):
    path = _coco(tmp_path, [], images=[{"id": 4, "file_name": "gone.png", "width": 5, "height": 5}])
    with pytest.raises(
        ValueError, match=r"ann\.json: image id 4 \(gone\.png\): image file .*gone\.png not found"
    ):
        validate_coco_json(path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"images": [], "annotations": []}'])
def test_not_coco_json(tmp_path, text):
    path = tmp_path / "ann.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"ann\.json: not a COCO"):
        validate_coco_json(path)


# ---------------------------------------------------------------------------------------------
# Wheel fetching: verification without the network
# ---------------------------------------------------------------------------------------------


def test_wheel_with_wrong_hash_is_rejected(tmp_path):
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/data.txt", "hello")
    with pytest.raises(ValueError, match="does not match the recorded"):
        fetch_from_wheel(
            "fake==1.0", "0" * 64, {"fake/data.txt": "0" * 64}, tmp_path / "c", wheel=wheel
        )
    assert not (tmp_path / "c" / "data.txt").exists()

    good = {"fake/data.txt": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
    paths = fetch_from_wheel("fake==1.0", sha256_of(wheel), good, tmp_path / "c", wheel=wheel)
    assert paths["fake/data.txt"].read_text() == "hello"  # sha256("hello") is the one above
    with pytest.raises(ValueError, match="member 'fake/data.txt' has sha256"):
        fetch_from_wheel(
            "fake==1.0", sha256_of(wheel), {"fake/data.txt": "1" * 64}, tmp_path / "d", wheel=wheel
        )
