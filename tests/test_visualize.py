"""The detections picture: ground truth and detections drawn in their own colours."""

import cv2
import numpy as np

from detectron2.structures import BoxMode

from retinanet_plugin.visualize import GROUND_TRUTH_COLOR, PREDICTION_COLOR, draw_prediction_grid


def test_draws_ground_truth_and_confident_detections(tmp_path):
    image_path = tmp_path / "tile.png"
    cv2.imwrite(str(image_path), np.zeros((100, 120, 3), np.uint8))
    record = {
        "file_name": str(image_path),
        "image_id": 7,
        "annotations": [{"bbox": [10, 10, 30, 30], "bbox_mode": BoxMode.XYXY_ABS}],
    }
    detections = [
        {"image_id": 7, "bbox": [50, 50, 20, 20], "score": 0.9},  # XYWH: x 50..70, y 50..70
        {"image_id": 7, "bbox": [80, 20, 10, 10], "score": 0.1},  # below the threshold
        {"image_id": 8, "bbox": [0, 60, 10, 10], "score": 0.9},  # another image
    ]
    grid = draw_prediction_grid([record, record], detections, score_thresh=0.3, columns=4)

    assert grid.shape == (100, 2 * 120, 3)  # two tiles side by side
    tile = grid[:, :120]
    assert tuple(tile[30, 10]) == GROUND_TRUTH_COLOR  # left edge of the ground-truth box
    assert tuple(tile[60, 50]) == PREDICTION_COLOR  # left edge of the confident detection
    assert not (tile[20:31, 80:91] == PREDICTION_COLOR).all(axis=-1).any()  # low score: not drawn
    assert not (tile[60:71, 0:11] == PREDICTION_COLOR).all(axis=-1).any()  # other image's box
