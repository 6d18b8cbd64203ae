"""The general COCO checker on real bad files: missing, truncated, undecodable, wrong sizes
(EXIF included), bad boxes, unknown categories, duplicate ids, empty datasets."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from retinanet_plugin.data import coco_check
from retinanet_plugin.data.coco_check import CocoCheckError, check_coco_json, image_size


def _jpeg(path, size=(60, 40), exif_orientation=None):
    """A (size) JPEG of noise; with exif_orientation, the stored pixels are ``size`` and the
    orientation tag says how to rotate them for display."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    image.save(path, quality=95, **kwargs)
    return path


def _png(path, size=(60, 40)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _truncate(path, keep=0.8):
    # Noise compresses badly: the first 80% hold the header and part of the pixel data.
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _write(tmp_path, images, annotations=(), categories=None, name="ann.json"):
    coco = {
        "images": list(images),
        "annotations": list(annotations),
        "categories": categories if categories is not None else [{"id": 1, "name": "shape"}],
    }
    path = tmp_path / name
    path.write_text(json.dumps(coco))  # NaN is written as the JS literal NaN, as json allows
    return path


def _img(iid, file_name, width=60, height=40):
    return {"id": iid, "file_name": file_name, "width": width, "height": height}


def _ann(aid, bbox, image_id=1, category_id=1):
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": bbox}


def test_valid_dataset_passes_in_every_mode(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    _png(tmp_path / "b.png")
    # Box touching the right and bottom edges (x + w = 60, y + h = 40) is inside.
    path = _write(
        tmp_path,
        [_img(1, "a.jpg"), _img(2, "b.png")],
        [_ann(1, [0, 0, 60, 40]), _ann(2, [10.5, 5.25, 20, 30], image_id=2)],
    )
    for mode in ("header", "decode", "off"):
        coco = check_coco_json(path, mode=mode, num_classes=1, require_annotations=True)
        assert [a["id"] for a in coco["annotations"]] == [1, 2]


@pytest.mark.parametrize("suffix, writer", [("jpg", _jpeg), ("png", _png)])
def test_truncated_file_is_found_from_the_header_without_decoding(
    tmp_path, monkeypatch, suffix, writer
):
    _truncate(writer(tmp_path / f"t.{suffix}"))
    path = _write(tmp_path, [_img(3, f"t.{suffix}")])

    def no_decode(self):
        raise AssertionError("header mode must not decode")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    fmt = {"jpg": "JPEG", "png": "PNG"}[suffix]
    with pytest.raises(
        CocoCheckError,
        match=rf"ann\.json: image id 3 \(t\.{suffix}\): image file .*t\.{suffix} "
        rf"is truncated: a {fmt} file must end with",
    ):
        check_coco_json(path)


def test_header_mode_never_decodes(tmp_path, monkeypatch):
    _jpeg(tmp_path / "a.jpg")
    _png(tmp_path / "b.png")
    path = _write(tmp_path, [_img(1, "a.jpg"), _img(2, "b.png")])
    calls = []
    monkeypatch.setattr(Image.Image, "load", lambda self: calls.append(self))
    check_coco_json(path)
    assert calls == []
    check_coco_json(path, mode="decode")
    assert {image.format for image in calls} == {"JPEG", "PNG"}  # decode mode decodes both


def test_corrupt_data_with_intact_end_needs_decode_mode(tmp_path):
    png = _png(tmp_path / "c.png", size=(64, 64))
    data = bytearray(png.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 20 : start + 60] = b"\x00" * 40  # compressed pixels broken, IEND kept
    png.write_bytes(bytes(data))
    path = _write(tmp_path, [_img(5, "c.png", 64, 64)])
    check_coco_json(path)  # the header and the end marker are intact
    with pytest.raises(
        CocoCheckError, match=r"image id 5 \(c\.png\): image file .*c\.png cannot be read"
    ):
        check_coco_json(path, mode="decode")


def test_missing_and_unreadable_files(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    path = _write(tmp_path, [_img(1, "gone.jpg"), _img(2, "text.jpg")])
    with pytest.raises(CocoCheckError) as e:
        check_coco_json(path)
    lines = str(e.value).splitlines()
    assert len(lines) == 2
    assert "ann.json: image id 1 (gone.jpg): image file" in lines[0] and "not found" in lines[0]
    assert "image id 2 (text.jpg)" in lines[1] and "cannot be read as an image" in lines[1]


def test_size_disagreeing_with_the_file(tmp_path):
    _png(tmp_path / "b.png", size=(60, 40))
    path = _write(tmp_path, [_img(4, "b.png", width=40, height=60)])
    with pytest.raises(
        CocoCheckError,
        match=r"image id 4 \(b\.png\): the JSON says 40x60 \(width x height\) but the file is "
        r"60x40$",
    ):
        check_coco_json(path)
    check_coco_json(path, mode="off")  # the size is read from the file only


def test_exif_rotation_is_accounted_for(tmp_path):
    # Stored 60x40 with orientation 6 (rotate 90 degrees clockwise): displayed, and loaded by
    # detectron2, as 40 wide x 60 high.
    _jpeg(tmp_path / "r.jpg", size=(60, 40), exif_orientation=6)
    assert image_size(tmp_path / "r.jpg") == (40, 60, 6)
    ok = _write(tmp_path, [_img(1, "r.jpg", width=40, height=60)], [_ann(1, [0, 30, 40, 30])])
    check_coco_json(ok)
    stale = _write(tmp_path, [_img(1, "r.jpg", width=60, height=40)], name="stale.json")
    with pytest.raises(
        CocoCheckError,
        match=r"stale\.json: image id 1 \(r\.jpg\): the JSON says 60x40 .* file is 40x60 after "
        r"its EXIF orientation 6, which detectron2 applies on load; the JSON has the size before "
        r"rotation",
    ):
        check_coco_json(stale)


@pytest.mark.parametrize(
    "bbox, message",
    [
        ([10, 10, 0, 5], r"bbox \[10, 10, 0, 5\] has zero or negative size"),
        ([10, 10, 5, -1], r"bbox .* has zero or negative size"),
        ([math.nan, 10, 5, 5], r"bbox \[nan, 10, 5, 5\] has a non-finite value"),
        ([10, 10, math.inf, 5], r"bbox \[10, 10, inf, 5\] has a non-finite value"),
        # 50 + 11 = 61 > 60 + 0.5 tolerance
        ([50, 10, 11, 5], r"bbox \[50, 10, 11, 5\] lies outside the 60x40 image"),
        ([10, -1, 5, 5], r"bbox .* lies outside the 60x40 image"),
        ([10, 10, 5], r"bbox \[10, 10, 5\] is not \[x, y, width, height\]"),
    ],
)
def test_bad_boxes_name_json_image_and_annotation(tmp_path, bbox, message):
    _jpeg(tmp_path / "a.jpg")
    path = _write(tmp_path, [_img(1, "a.jpg")], [_ann(1, [0, 0, 5, 5]), _ann(17, bbox)])
    with pytest.raises(CocoCheckError, match=r"ann\.json: annotation id 17 \(image id 1, a\.jpg\): "
                       + message):  # fmt: skip
        check_coco_json(path, mode="off")


def test_rounding_overshoot_is_tolerated(tmp_path):
    # COCO's own files have boxes ending a fraction of a pixel past the edge: 59.6 + 0.8 = 60.4.
    path = _write(tmp_path, [_img(1, "a.jpg")], [_ann(1, [59.6, 0, 0.8, 40.3])])
    check_coco_json(path, mode="off")


def test_ids_categories_and_empty(tmp_path):
    path = _write(
        tmp_path,
        [_img(1, "a.jpg"), _img(1, "b.jpg")],
        [_ann(1, [0, 0, 5, 5]), _ann(1, [0, 0, 5, 5]), _ann(2, [0, 0, 5, 5], category_id=9)],
        categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}],
    )
    with pytest.raises(CocoCheckError) as e:
        check_coco_json(path, mode="off")
    text = str(e.value)
    assert "ann.json: category id 1: duplicate id" in text
    assert "ann.json: image id 1: duplicate id (also 'a.jpg')" in text
    assert "ann.json: annotation id 1: duplicate id" in text
    assert "annotation id 2 (image id 1, a.jpg): category_id 9 not in categories [1]" in text

    empty = _write(tmp_path, [], name="empty.json")
    with pytest.raises(CocoCheckError, match=r"empty\.json: no images: the dataset is empty"):
        check_coco_json(empty)
    unlabelled = _write(tmp_path, [_img(1, "a.jpg")], name="unlabelled.json")
    check_coco_json(unlabelled, mode="off")  # fine for evaluation ...
    with pytest.raises(CocoCheckError, match=r"unlabelled\.json: no annotations"):
        check_coco_json(unlabelled, mode="off", require_annotations=True)  # ... not for training


def test_num_classes_disagreeing_with_categories(tmp_path):
    cats = [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]
    path = _write(tmp_path, [_img(1, "a.jpg")], categories=cats)
    with pytest.raises(
        CocoCheckError,
        match=r"ann\.json: 3 categories but MODEL\.RETINANET\.NUM_CLASSES is 80; set "
        r"MODEL\.RETINANET\.NUM_CLASSES to 3",
    ):
        check_coco_json(
            path, mode="off", num_classes=80, num_classes_key="MODEL.RETINANET.NUM_CLASSES"
        )
    check_coco_json(path, mode="off", num_classes=3)


def test_error_list_is_capped(tmp_path):
    path = _write(tmp_path, [_img(i, f"{i}.jpg") for i in range(1, 31)])
    with pytest.raises(CocoCheckError) as e:
        check_coco_json(path, max_errors=5)
    lines = str(e.value).splitlines()
    assert len(lines) == 6 and lines[-1] == "... and 25 more"  # 30 missing files, 5 listed


def test_command_line(tmp_path, capsys):
    _jpeg(tmp_path / "a.jpg")
    good = _write(tmp_path, [_img(1, "a.jpg")], [_ann(1, [0, 0, 5, 5])])
    assert coco_check.main([str(good)]) == 0
    assert "1 images, 1 annotations, 1 categories: OK" in capsys.readouterr().out
    bad = _write(tmp_path, [_img(1, "a.jpg")], [_ann(1, [0, 0, 0, 5])], name="bad.json")
    assert coco_check.main([str(bad), "--image-root", str(tmp_path), "--mode", "decode"]) == 1
    assert "bad.json: annotation id 1 (image id 1, a.jpg)" in capsys.readouterr().err


def test_image_beyond_the_decompression_bomb_limit(tmp_path, monkeypatch):
    # Pillow refuses images over twice MAX_IMAGE_PIXELS; lowered so a 60x40 (2400 px) file is one.
    _png(tmp_path / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = _write(tmp_path, [_img(8, "b.png")])
    with pytest.raises(
        CocoCheckError, match=r"image id 8 \(b\.png\): .* cannot be read as an image "
        r"\(DecompressionBombError: Image size \(2400 pixels\) exceeds limit"
    ):  # fmt: skip
        check_coco_json(path)
