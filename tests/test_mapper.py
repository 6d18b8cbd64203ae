"""One dataset mapper (issue 15, item 5): crowd regions, the extra augmentations and the robust
image reading are options of one mapper, which every loader builds through
``build_dataset_mapper``. With ``MODEL.RETINANET.CROWD_IGNORE`` the training loader used to take
a second mapper (``CrowdDatasetMapper``, a subclass of detectron2's plain ``DatasetMapper``) that
truncated integer boxes and read 16-bit and corrupt images as detectron2 does."""

import numpy as np
import pytest
from PIL import Image
from test_train_net import _load_train_net

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from retinanet_plugin import add_retinanet_plugin_config
from retinanet_plugin.data import RobustDatasetMapper, build_dataset_mapper

H = W = 80
# Shorter side 80 -> 107: every coordinate is scaled by 107 / 80 = 1.3375.
SCALE = 107 / 80
# Integer XYWH boxes, as hand-made COCO files hold them.
TREE = [20, 10, 10, 10]  # XYXY [20, 10, 30, 20] -> [26.75, 13.375, 40.125, 26.75]
CROWD = [40, 40, 30, 20]  # XYXY [40, 40, 70, 60] -> [53.5, 53.5, 93.625, 80.25]


def _cfg(**keys):
    cfg = add_retinanet_plugin_config(get_cfg())
    cfg.MODEL.RETINANET.CROWD_IGNORE = True
    cfg.INPUT.MIN_SIZE_TRAIN = (107,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.merge_from_list([v for kv in keys.items() for v in kv])
    return cfg


def _record(path, image_id=1):
    def anno(box, crowd, category):
        return {"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": category,
                "iscrowd": crowd}  # fmt: skip

    return {"file_name": str(path), "image_id": image_id, "height": H, "width": W,
            "annotations": [anno(TREE, 0, 1), anno(CROWD, 1, 0)]}  # fmt: skip


def _png(path, pixels):
    Image.fromarray(pixels).save(path)
    return path


def _corrupt(path):
    """Noise over the second half of the compressed pixels: the header reads, decoding fails."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    noise = np.random.default_rng(1).integers(0, 256, length - length // 2, dtype=np.uint8)
    data[start + length // 2 : start + length] = noise.tobytes()
    path.write_bytes(bytes(data))
    return path


def _expected_boxes():
    def scaled(box):
        x, y, w, h = box
        return [v * SCALE for v in (x, y, x + w, y + h)]

    return [scaled(TREE), scaled(CROWD)]


# The mapper as train_net.py builds it, and constructed directly with keep_crowd (as
# tests/test_test_time.py does).
BUILDERS = {
    "build_dataset_mapper": lambda cfg: build_dataset_mapper(cfg, is_train=True),
    "keep_crowd": lambda cfg: RobustDatasetMapper(cfg, is_train=True, keep_crowd=True),
}


@pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS.keys())
def test_crowd_regions_keep_fractional_boxes(tmp_path, build):
    path = _png(tmp_path / "tile.png", np.zeros((H, W, 3), np.uint8))
    instances = build(_cfg())(_record(path))["instances"]
    # Truncated, the tree would be [26, 13, 40, 26] and the crowd [53, 53, 93, 80].
    boxes = instances.gt_boxes.tensor.tolist()
    np.testing.assert_allclose(boxes, _expected_boxes(), rtol=1e-6)
    assert instances.gt_classes.tolist() == [1, 0]
    assert instances.gt_is_crowd.tolist() == [False, True]


@pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS.keys())
def test_crowd_regions_read_16_bit_and_refuse_corrupt_images(tmp_path, build):
    mapper = build(_cfg())
    # 16-bit grayscale 40000 keeps its high byte, 40000 >> 8 = 156 (detectron2 clips it to 255).
    wide = _png(tmp_path / "wide.png", np.full((H, W), 40000, np.uint16))
    image = mapper(_record(wide))["image"]
    assert image.unique().tolist() == [156]
    # A corrupt PNG raises, naming the file (detectron2 reads it as zeros).
    broken = _corrupt(
        _png(
            tmp_path / "broken.png",
            np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8),
        )
    )
    with pytest.raises(OSError, match=r"broken\.png \(image id 1\): cannot decode the image"):
        mapper(_record(broken))


def test_crowd_regions_with_skipped_images(tmp_path):
    broken = _corrupt(
        _png(
            tmp_path / "broken.png",
            np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8),
        )
    )
    mapper = build_dataset_mapper(_cfg(**{"DATALOADER.SKIP_UNREADABLE_IMAGES": True}), True)
    assert mapper(_record(broken)) is None and mapper.skipped.value == 1
    # Evaluation drops annotations, crowd or not, and never skips.
    test_mapper = build_dataset_mapper(_cfg(), is_train=False)
    assert "instances" not in test_mapper(
        _record(_png(tmp_path / "ok.png", np.zeros((H, W, 3), np.uint8)))
    )
    with pytest.raises(OSError):
        test_mapper(_record(broken))


def test_train_net_loader_uses_the_one_mapper(tmp_path):
    """train_net.py's training loader with CROWD_IGNORE and SKIP_UNREADABLE_IMAGES (refused as a
    combination before): crowd boxes kept, coordinates not truncated."""
    name = "one_mapper_crowd_test"
    path = _png(tmp_path / "tile.png", np.zeros((H, W, 3), np.uint8))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [_record(path)])
    MetadataCatalog.get(name).thing_classes = ["crowd", "tree"]
    cfg = _cfg(
        **{
            "DATALOADER.SKIP_UNREADABLE_IMAGES": True,
            "DATALOADER.NUM_WORKERS": 0,
            "SOLVER.IMS_PER_BATCH": 1,
            "DATASETS.TRAIN": (name,),
            "SEED": 1,
        }
    )
    loader = _load_train_net().Trainer.build_train_loader(cfg)
    (mapped,) = next(iter(loader))
    np.testing.assert_allclose(
        mapped["instances"].gt_boxes.tensor.tolist(), _expected_boxes(), rtol=1e-6
    )
    assert mapped["instances"].gt_is_crowd.tolist() == [False, True]
