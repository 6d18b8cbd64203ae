"""The detections picture: ground truth, and detections labelled with class name and score."""

import cv2
import numpy as np

from detectron2.structures import BoxMode

from retinanet_plugin.visualize import _CLASS_COLORS, GROUND_TRUTH_COLOR, draw_prediction_grid

FIRST_CLASS_COLOR = _CLASS_COLORS[0]


def _record(tmp_path, size=(100, 120)):
    image_path = tmp_path / "tile.png"
    cv2.imwrite(str(image_path), np.zeros(size + (3,), np.uint8))
    return {
        "file_name": str(image_path),
        "image_id": 7,
        "annotations": [{"bbox": [10, 10, 30, 30], "bbox_mode": BoxMode.XYXY_ABS}],
    }


def test_draws_ground_truth_and_confident_detections(tmp_path):
    record = _record(tmp_path)
    detections = [  # dataset category id 5 is class 0, "tree"
        {"image_id": 7, "category_id": 5, "bbox": [50, 50, 20, 20], "score": 0.9},  # x 50..70
        {"image_id": 7, "category_id": 5, "bbox": [80, 20, 10, 10], "score": 0.1},  # too low
        {"image_id": 8, "category_id": 5, "bbox": [0, 60, 10, 10], "score": 0.9},  # other image
    ]
    grid = draw_prediction_grid([record, record], detections, score_thresh=0.3, columns=4,
                                class_names=["tree"], dataset_id_to_contiguous_id={5: 0},
                                min_side=0)

    assert grid.shape == (100, 2 * 120, 3)  # two tiles side by side
    tile = grid[:, :120]
    assert tuple(tile[30, 10]) == GROUND_TRUTH_COLOR  # left edge of the ground-truth box
    assert tuple(tile[65, 50]) == FIRST_CLASS_COLOR  # left edge of the confident detection
    assert not (tile[20:31, 80:91] == FIRST_CLASS_COLOR).all(axis=-1).any()  # low score
    assert not (tile[60:71, 0:11] == FIRST_CLASS_COLOR).all(axis=-1).any()  # other image's box
    # The label "tree 0.90" sits on a filled band of the class colour right above the box, as
    # wide as that text.
    (tw, th), _ = cv2.getTextSize("tree 0.90", cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    band = (tile[49 - th // 2] == FIRST_CLASS_COLOR).all(axis=-1)
    assert band[50:50 + tw // 2].sum() > tw // 4  # mostly colour (the text is white)
    assert not band[50 + tw + 2:].any()


def test_small_tiles_are_enlarged_for_legible_labels(tmp_path):
    record = _record(tmp_path)
    detections = [{"image_id": 7, "category_id": 0, "bbox": [50, 50, 20, 20], "score": 0.9}]
    grid = draw_prediction_grid([record], detections, class_names=["tree"], min_side=300)
    assert grid.shape == (300, 360, 3)  # 100x120 enlarged 3 times
    assert tuple(grid[30 * 3, 10 * 3]) == GROUND_TRUTH_COLOR
