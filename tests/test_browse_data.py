"""browse_data: the boxes drawn are the training mapper's, where its flips put them; crowd
regions kept by CROWD_IGNORE drawn grey; raw dataset dicts converted from their box mode."""

import cv2
import numpy as np
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from retinanet_plugin.analysis.browse import CROWD_COLOR, browse_samples, draw_sample
from retinanet_plugin.data import build_dataset_mapper
from retinanet_plugin.tools import browse_data
from retinanet_plugin.visualize import _CLASS_COLORS

from small_config import small_retinanet_cfg

NAME = "browse_data_tiny_for_tests"
H, W = 60, 80


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browse")
    # A horizontal ramp (value = 3 x column) makes a flip visible in the pixels.
    ramp = np.repeat((np.arange(W, dtype=np.uint8) * 3)[None, :, None], H, 0).repeat(3, 2)
    records = []
    for i in range(3):
        path = str(folder / f"img{i}.png")
        cv2.imwrite(path, ramp)
        records.append({
            "file_name": path, "image_id": 100 + i, "height": H, "width": W,
            "annotations": [
                # XYWH: x 10..25, y 20..30, class 1 ("bush")
                {"bbox": [10, 20, 15, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1,
                 "iscrowd": 0},
                # a crowd region, x 50..70, y 5..45
                {"bbox": [50, 5, 70, 45], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0,
                 "iscrowd": 1},
            ],
        })
    if NAME not in DatasetCatalog.list():
        DatasetCatalog.register(NAME, lambda: records)
        MetadataCatalog.get(NAME).thing_classes = ["tree", "bush"]
    return records


def _cfg(*opts):
    cfg = small_retinanet_cfg(num_convs=1)
    cfg.DATASETS.TRAIN = (NAME,)
    cfg.DATASETS.TEST = ()
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (60,)  # the images' own size: no resize
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.MODEL.RETINANET.CROWD_IGNORE = True
    cfg.merge_from_list(list(opts))
    return cfg


def test_drawn_boxes_are_the_mappers(dataset):
    cfg = _cfg("INPUT.MIN_SIZE_TRAIN", "(45, 90)", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "range",
               "INPUT.ROTATE_90", "True", "INPUT.COLOR_JITTER", "0.4")
    samples, about = browse_samples(cfg, 3, seed=7)
    mapper = build_dataset_mapper(cfg, is_train=True)
    for i, (sample, record) in enumerate(zip(samples, dataset)):
        assert sample.seed == (7, i)
        np.random.seed([7, i])  # what browse_samples seeds image i with
        mapped = mapper(record)
        instances = mapped["instances"]
        np.testing.assert_array_equal(sample.boxes, instances.gt_boxes.tensor.numpy())
        np.testing.assert_array_equal(sample.classes, instances.gt_classes.numpy())
        np.testing.assert_array_equal(sample.crowd, instances.gt_is_crowd.numpy())
        # The same pixels, RGB (INPUT.FORMAT) turned BGR for OpenCV.
        np.testing.assert_array_equal(sample.image[:, :, ::-1],
                                      mapped["image"].permute(1, 2, 0).numpy())
    assert about["dataset"] == NAME and about["class_names"] == ["tree", "bush"]
    assert [a.split("(")[0] for a in about["augmentations"]] == [
        "ResizeShortestEdge", "RandomFlip", "RandomRot90", "RandomBrightness", "RandomContrast",
        "RandomSaturation"]
    # The sizes drawn vary with the scale jitter: not every image kept 60x80.
    assert len({s.image.shape for s in samples}) > 1


def test_flipped_box_drawn_where_the_flip_puts_it(dataset):
    samples, about = browse_samples(_cfg(), 3, seed=1)
    flipped = [s for s in samples if s.steps == ["resize 60x80->60x80", "h-flip"]]
    kept = [s for s in samples if s.steps == ["resize 60x80->60x80"]]
    assert len(flipped) == 2 and len(kept) == 1  # the draws of seeds [1, 0..2]
    # Not flipped: x 10..25; flipped: x 80 - 25 .. 80 - 10 = 55..70 (crowd: 10..30).
    np.testing.assert_array_equal(kept[0].boxes, [[10, 20, 25, 30], [50, 5, 70, 45]])
    np.testing.assert_array_equal(flipped[0].boxes, [[55, 20, 70, 30], [10, 5, 30, 45]])
    assert flipped[0].image[0, 0, 0] == 3 * (W - 1)  # the ramp runs the other way

    picture, scale, top = draw_sample(flipped[0], about, min_side=120)
    assert scale == 2 and picture.shape[1] == 2 * W
    # The bush's left edge at x 55 * 2 = 110, halfway down the box: y 25 * 2 = 50 (the label
    # sits above the box).
    assert tuple(picture[top + 50, 110]) == _CLASS_COLORS[1]
    assert tuple(picture[top + 50, 2 * 10]) == CROWD_COLOR  # the crowd's left edge, x 10 * 2
    # Inside the crowd region: half grey, half image (addWeighted 0.5 / 0.5, rounded).
    y, x = 40, 40  # at 2x: image pixel (20, 20)
    expected = np.round(0.5 * flipped[0].image[20, 20].astype(float) + 0.5 * 128)
    np.testing.assert_allclose(picture[top + y, x], expected, atol=1)
    # The image that was not flipped has the bush's left edge at x 10 * 2 = 20.
    picture, scale, top = draw_sample(kept[0], about, min_side=120)
    assert tuple(picture[top + 50, 20]) == _CLASS_COLORS[1]
    assert tuple(picture[top + 50, 110]) != _CLASS_COLORS[1]


def test_crowd_dropped_without_crowd_ignore(dataset):
    samples, _ = browse_samples(_cfg("MODEL.RETINANET.CROWD_IGNORE", "False"), 1)
    assert not samples[0].crowd.any() and len(samples[0].boxes) == 1
    assert samples[0].dropped_crowd == 1


def test_raw_source_converts_the_box_mode(dataset):
    samples, about = browse_samples(_cfg(), 1, source="dataset")
    # XYWH [10, 20, 15, 10] -> XYXY [10, 20, 25, 30]; the crowd box is XYXY already.
    np.testing.assert_array_equal(samples[0].boxes, [[10, 20, 25, 30], [50, 5, 70, 45]])
    np.testing.assert_array_equal(samples[0].crowd, [False, True])
    assert samples[0].steps == [] and about["source"] == "dataset"
    np.testing.assert_array_equal(samples[0].image, cv2.imread(dataset[0]["file_name"]))


def test_tool_writes_one_picture_per_image_or_a_grid(dataset, tmp_path):
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(_cfg().dump())
    paths = browse_data.main(["--config-file", str(config_file), "--num-images", "2",
                              "--min-side", "0", "--output", str(tmp_path / "each")])
    assert [p.rsplit("/", 1)[1] for p in paths] == ["000_img0.jpg", "001_img1.jpg"]
    image = cv2.imread(paths[0])
    assert image.shape[1] == W and image.shape[0] > H  # the image below its header
    paths = browse_data.main(["--config-file", str(config_file), "--num-images", "3", "--grid",
                              "--columns", "2", "--min-side", "0", "--output", str(tmp_path)])
    grid = cv2.imread(paths[0])
    assert paths[0].endswith("browse_mapper.jpg") and grid.shape[1] == 2 * W
    with pytest.raises(KeyError, match="--dataset nope: not a registered dataset"):
        browse_data.main(["--config-file", str(config_file), "--dataset", "nope"])
