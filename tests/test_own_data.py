"""Own data without code: datasets named in the config (DATASETS.COCO_INSTANCES), checked before
training (DATASETS.CHECK), unreadable images skipped on request, non-finite losses named.

The data are small synthetic "shapes" COCO files written in ``tmp_path``; runs use
``train_net.py``'s own ``setup`` / ``main`` with the CPU demo model (random weights, 64 px).
"""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_net import _load_train_net

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.engine import SimpleTrainer, default_argument_parser

from retinanet_plugin import add_retinanet_plugin_config
from retinanet_plugin.data import CocoCheckError, RobustDatasetMapper, register_datasets_from_cfg
from retinanet_plugin.data.registration import resolve_dataset_paths
from retinanet_plugin.engine import BatchRecorder, guard_nonfinite_losses

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.yaml"
FAST_OPTS = [
    "MODEL.MOBILENET.PRETRAINED", "False",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "SEED", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def train_net():
    return _load_train_net()


@pytest.fixture(autouse=True)
def eager_focal_loss(monkeypatch):
    # These tests are about data, not the fused loss: skip its one-off torch.compile (seconds).
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")


def _corrupt_png(path):
    """Replaces the second half of the compressed pixels by noise: header and IEND intact (the
    header check passes), decoding fails ("broken data stream")."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    noise = np.random.default_rng(1).integers(0, 256, length - length // 2, dtype=np.uint8)
    data[start + length // 2 : start + length] = noise.tobytes()
    path.write_bytes(bytes(data))


def _shapes(folder, n=4, corrupt=(), categories=("shape",)):
    """n noisy 64x64 PNGs with one bright square each, as a COCO JSON; images ``corrupt``
    (indices) are broken in the middle (see _corrupt_png). Returns the JSON path."""
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(n):
        pixels = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        x, y = 8 + 4 * i, 12 + 2 * i
        pixels[y : y + 24, x : x + 20] = 230
        name = f"img{i}.png"
        Image.fromarray(pixels).save(images_dir / name)
        if i in corrupt:
            _corrupt_png(images_dir / name)
        images.append({"id": 10 + i, "file_name": name, "width": 64, "height": 64})
        annotations.append(
            {"id": 100 + i, "image_id": 10 + i, "category_id": 1, "bbox": [x, y, 20, 24]}
        )
    cats = [{"id": k + 1, "name": c} for k, c in enumerate(categories)]
    path = folder / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return path


def _args(config_file, output_dir, *opts):
    argv = ["--config-file", str(config_file)] + FAST_OPTS + ["OUTPUT_DIR", str(output_dir)]
    return default_argument_parser().parse_args(argv + list(opts))


def _yaml(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_config_that_sets_them(train_net, tmp_path, monkeypatch):
    project = tmp_path / "project"
    _shapes(project / "data")
    base = _yaml(
        project / "configs" / "base.yaml",
        f'_BASE_: "{DEMO_CONFIG}"\n'
        "DATASETS:\n"
        '  COCO_INSTANCES: [["rel_train", "../data/train.json", "../data/images"]]\n'
        '  TRAIN: ("rel_train",)\n',
    )
    # Inherits the key from base.yaml: paths are relative to base.yaml's folder, not its own.
    child = _yaml(project / "configs" / "sub" / "child.yaml", '_BASE_: "../base.yaml"\n')
    monkeypatch.chdir(tmp_path)  # neither config's folder
    expected = [["rel_train", str(project / "data" / "train.json"), str(project / "data/images")]]
    # The key's own file: resolved against it (resolve_dataset_paths is what setup() calls).
    cfg = add_retinanet_plugin_config(get_cfg())
    cfg.merge_from_file(str(base))
    resolve_dataset_paths(cfg, str(base))
    assert cfg.DATASETS.COCO_INSTANCES == expected
    for _ in range(2):  # a second setup() in the same process with the same data is harmless
        cfg = train_net.setup(_args(child, tmp_path / "out"))
        assert cfg.DATASETS.COCO_INSTANCES == expected
        assert MetadataCatalog.get("rel_train").json_file == expected[0][1]
        assert len(DatasetCatalog.get("rel_train")) == 4
    # The saved config holds absolute paths: it runs from any directory.
    assert str(project / "data" / "train.json") in (tmp_path / "out" / "config.yaml").read_text()

    # On the command line, relative paths are relative to the working directory.
    cli = "[['rel_cli', 'project/data/train.json', 'project/data/images']]"
    cfg = train_net.setup(
        _args(
            base, tmp_path / "out", "DATASETS.COCO_INSTANCES", cli, "DATASETS.TRAIN", "('rel_cli',)"
        )
    )
    assert cfg.DATASETS.COCO_INSTANCES[0][1] == str(project / "data" / "train.json")


def test_reregistration_and_name_clashes(tmp_path, caplog):
    first, second = _shapes(tmp_path / "a"), _shapes(tmp_path / "b", n=2)

    def register(json_path, name="rereg_train"):
        cfg = add_retinanet_plugin_config(get_cfg())
        cfg.DATASETS.COCO_INSTANCES = [[name, str(json_path), str(json_path.parent / "images")]]
        return register_datasets_from_cfg(cfg)  # what train_net.setup() calls

    assert register(first) == register(first) == ["rereg_train"]
    assert len(DatasetCatalog.get("rereg_train")) == 4
    # train_net.setup() gives "retinanet_plugin" its own handlers (no propagation to the root,
    # where caplog listens): listen on it directly.
    plugin_logger = logging.getLogger("retinanet_plugin")
    plugin_logger.addHandler(caplog.handler)
    try:
        register(second)  # the config changed: it wins, with a warning
    finally:
        plugin_logger.removeHandler(caplog.handler)
    assert "re-registering 'rereg_train'" in caplog.text
    assert len(DatasetCatalog.get("rereg_train")) == 2
    with pytest.raises(ValueError, match=r"dataset 'coco_2017_train' is already registered"):
        register(first, name="coco_2017_train")  # detectron2's builtin: never overwritten


def test_num_classes_must_match_the_categories(train_net, tmp_path):
    data = _shapes(tmp_path, categories=("shape", "circle", "star"))
    entry = f"[['three_classes', '{data}', '{tmp_path / 'images'}']]"
    opts = ["DATASETS.COCO_INSTANCES", entry, "DATASETS.TRAIN", "('three_classes',)"]
    with pytest.raises(
        CocoCheckError, match=r"train\.json: 3 categories but MODEL\.RETINANET\.NUM_CLASSES is 1"
    ):
        train_net.setup(_args(DEMO_CONFIG, tmp_path / "out", *opts))
    train_net.setup(_args(DEMO_CONFIG, tmp_path / "out", *opts, "MODEL.RETINANET.NUM_CLASSES", "3"))


def test_bad_data_stops_the_run_before_training(train_net, tmp_path):
    data = _shapes(tmp_path, n=3)
    (tmp_path / "images" / "img1.png").unlink()
    entry = f"[['missing_image', '{data}', '{tmp_path / 'images'}']]"
    opts = ["DATASETS.COCO_INSTANCES", entry, "DATASETS.TRAIN", "('missing_image',)"]
    out = tmp_path / "out"
    with pytest.raises(
        CocoCheckError, match=r"train\.json: image id 11 \(img1\.png\): image file .* not found"
    ):
        train_net.main(_args(DEMO_CONFIG, out, *opts, "SOLVER.MAX_ITER", "1"))
    assert not list(out.glob("model_*.pth")) and not (out / "metrics.json").exists()


def test_mapper_names_or_skips_an_undecodable_image(tmp_path):
    data = _shapes(tmp_path, n=1, corrupt=(0,))
    (record,) = load_coco_json(str(data), str(tmp_path / "images"))
    cfg = add_retinanet_plugin_config(get_cfg())
    with pytest.raises(OSError, match=r"img0\.png \(image id 10\): cannot decode the image"):
        RobustDatasetMapper(cfg, is_train=True)(record)
    cfg.DATALOADER.SKIP_UNREADABLE_IMAGES = True
    mapper = RobustDatasetMapper(cfg, is_train=True)
    assert mapper(record) is None and mapper.skipped.value == 1
    # Evaluation never skips: a dropped image would change the AP.
    with pytest.raises(OSError):
        RobustDatasetMapper(cfg, is_train=False)(record)


def test_skipped_images_are_logged_and_counted_in_the_metrics(train_net, tmp_path):
    # Corrupt in the middle: passes the default header check, fails when the loader decodes.
    data = _shapes(tmp_path, n=4, corrupt=(1, 2))
    entry = f"[['with_corrupt', '{data}', '{tmp_path / 'images'}']]"
    out = tmp_path / "out"
    train_net.main(
        _args(
            DEMO_CONFIG,
            out,
            "DATASETS.COCO_INSTANCES",
            entry,
            "DATASETS.TRAIN",
            "('with_corrupt',)",
            "DATALOADER.SKIP_UNREADABLE_IMAGES",
            "True",
            "DATALOADER.NUM_WORKERS",
            "1",  # counted across the worker process
            "SOLVER.MAX_ITER",
            "4",
        )
    )
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    counts = [r["data/skipped_images"] for r in records if "data/skipped_images" in r]
    # 4 steps x 2 images drawn at random from 2 good and 2 bad: some bad ones were drawn.
    assert counts and counts[-1] > 0, records
    assert (out / "model_final.pth").is_file()  # and training went on to the end
    log = (out / "log.txt").read_text()  # written by the worker process too
    assert "Skipping" in log and (
        "img1.png (image id 11)" in log or "img2.png (image id 12)" in log
    )


class _LossModel(torch.nn.Module):
    def __init__(self, losses):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.losses = losses

    def forward(self, batch):
        return {k: self.weight * v for k, v in self.losses.items()}


def test_nonfinite_loss_names_the_loss_iteration_and_images():
    batches = BatchRecorder([[{"image_id": 7}, {"image_id": 9}]] * 3)
    model = _LossModel({"loss_cls": torch.tensor(0.5), "loss_box_reg": torch.tensor(float("nan"))})
    trainer = SimpleTrainer(model, batches, torch.optim.SGD(model.parameters(), lr=0.1))
    guard_nonfinite_losses(trainer, batches)
    with pytest.raises(
        FloatingPointError,
        match=r"Non-finite loss at iteration 0: loss_box_reg = nan; image ids of this process's "
        r"batch: \[7, 9\]\. detectron2 said: Loss became infinite or NaN",
    ):
        trainer.train(0, 2)


def test_nonfinite_loss_in_a_real_run(train_net, tmp_path):
    data = _shapes(tmp_path, n=2)
    entry = f"[['nan_run', '{data}', '{tmp_path / 'images'}']]"
    # A pixel std of 0 divides every normalised pixel by zero: the losses become NaN at once.
    with pytest.raises(
        FloatingPointError,
        match=r"Non-finite loss at iteration 0: loss_cls = nan.*image ids of "
        r"this process's batch: \[1[01], 1[01]\]",
    ):
        train_net.main(
            _args(
                DEMO_CONFIG,
                tmp_path / "out",
                "DATASETS.COCO_INSTANCES",
                entry,
                "DATASETS.TRAIN",
                "('nan_run',)",
                "MODEL.PIXEL_STD",
                "[0.0, 0.0, 0.0]",
                "SOLVER.MAX_ITER",
                "2",
            )
        )
