"""analyze_anchors and loss_cdf with a Python (lazy) config: the same report, tables and files
as with its YAML twin, on a tiny synthetic COCO set; the YAML keys these tools read are
converted exactly (lazy.yacs_keys) for every config twin."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.modeling import build_model

from retinanet_plugin import RetinaNetCheckpointer
from retinanet_plugin import anchors as aa
from retinanet_plugin.config import load_config
from retinanet_plugin.lazy import load_lazy_config, yacs_keys
from retinanet_plugin.tools import analyze_anchors, loss_cdf

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DATASET = "lazy_anchor_tools_tiny"
# The keys analyze_anchors and loss_cdf read (RETINANET's of a one-stage model, RPN's of a
# two-stage one), each compared between a .py config's conversion and its YAML twin.
KEYS = [
    "MODEL.META_ARCHITECTURE", "MODEL.ANCHOR_GENERATOR.NAME", "MODEL.ANCHOR_GENERATOR.SIZES",
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "MODEL.ANCHOR_GENERATOR.OFFSET",
    "INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN", "INPUT.MIN_SIZE_TRAIN_SAMPLING",
    "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST", "INPUT.FORMAT", "DATASETS.TRAIN",
    "DATASETS.TEST", "OUTPUT_DIR",
]  # fmt: skip
HEAD_KEYS = ["IN_FEATURES", "IOU_THRESHOLDS", "IOU_LABELS"]
RETINANET_KEYS = ["NUM_CLASSES", "ALLOW_LOW_QUALITY_MATCHES"]


@pytest.fixture(autouse=True)
def eager_focal_loss(monkeypatch):
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_yacs_keys_of_every_lazy_config_equal_its_yaml_twins(name):
    keys = yacs_keys(load_lazy_config(str(CONFIGS / f"{name}.py")))
    yaml = load_config(str(CONFIGS / f"{name}.yaml"))
    head = "RPN" if yaml.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" else "RETINANET"
    names = KEYS + [f"MODEL.{head}.{k}" for k in HEAD_KEYS]
    names += [f"MODEL.RETINANET.{k}" for k in RETINANET_KEYS] if head == "RETINANET" else []
    for key in names:
        assert _get(keys, key) == _get(yaml, key), key


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three 64x80 images with boxes from 6 to 40 px, category id 5; (json file, folder)."""
    folder = tmp_path_factory.mktemp("lazy_anchor_tools") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        images.append({"id": 1 + i, "file_name": f"{i}.png", "height": 64, "width": 80})
        for j, side in enumerate((6.0, 17.0, 40.0)):
            annotations.append({
                "id": len(annotations) + 1, "image_id": 1 + i, "category_id": 5,
                "bbox": [3.0 + 9 * j + i, 4.0 + 5 * j, side, side * (0.6 + 0.3 * j)],
                "area": side * side, "iscrowd": 0,
            })
    json_file = folder.parent / "instances.json"
    json_file.write_text(json.dumps({
        "images": images, "annotations": annotations, "categories": [{"id": 5, "name": "tree"}],
    }))
    return str(json_file), str(folder)


def _opts(data, demo=True):
    """The same overrides for both kinds: the tiny set, trained and tested at 64 px; the demo
    without ImageNet weights and with every candidate kept."""
    entry = [DATASET, *data]
    yaml = [
        "DATASETS.COCO_INSTANCES", repr([entry]), "DATASETS.TRAIN", f"('{DATASET}',)",
        "DATASETS.TEST", f"('{DATASET}',)", "INPUT.MIN_SIZE_TRAIN", "(56, 64)",
        "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    ]  # fmt: skip
    lazy = [
        f"dataloader.coco_instances={[entry]!r}", f"dataloader.train.dataset.names={DATASET}",
        f"dataloader.test.dataset.names={DATASET}",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[56,64]",
        "dataloader.train.mapper.augmentations.0.max_size=96",
        "dataloader.test.mapper.augmentations.0.short_edge_length=64",
        "dataloader.test.mapper.augmentations.0.max_size=96",
    ]  # fmt: skip
    if demo:
        yaml += ["MODEL.MOBILENET.PRETRAINED", "False",
                 "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
        lazy += ["model.backbone.bottom_up.features.pretrained=False",
                 "model.test_score_thresh=0.0"]
    return yaml, lazy


@pytest.mark.parametrize("name", ["demo_deepforest_mobilenet_v2_fpn",
                                  "faster_rcnn_focal_rpn_R_50_FPN_1x"])
def test_analyze_anchors_of_a_lazy_config_equals_its_yaml_twins(name, data, tmp_path, capsys):
    """The whole report (coverage tables, proposal, its config lines) and the printed tables;
    the FocalRPN twin reads the RPN's keys on both paths."""
    yaml_opts, lazy_opts = _opts(data, demo=name.startswith("demo"))
    reports, printed = {}, {}
    for kind, opts in (("yaml", yaml_opts), ("py", lazy_opts)):
        out = tmp_path / kind
        reports[kind] = analyze_anchors.main([
            "--config-file", str(CONFIGS / f"{name}.{kind}"), "--output", str(out),
            "--search-pairs", "200", *opts,
        ])  # fmt: skip
        printed[kind] = capsys.readouterr().out.replace(str(out), "OUT")
        saved = json.loads((out / "anchor_report.json").read_text())
        assert saved["config_file"].endswith(f"{name}.{kind}")
        assert saved["syntax"] == {"yaml": "yaml", "py": "lazy"}[kind]
        for report in (saved, reports[kind]):
            report.pop("config_file")
            report.pop("syntax")
            report["histogram"] = report["histogram"].replace(str(out), "OUT")
        assert saved == json.loads(json.dumps(reports[kind]))
    assert reports["yaml"]["boxes"] == 9 and reports["yaml"]["datasets"] == [DATASET]
    # The same changes (as YAML keys), measured alike; only their override words differ: KEY
    # VALUE pairs for the YAML config, key=value words for the .py one.
    words = {}
    for kind in ("py", "yaml"):
        words[kind] = [entry.pop("arguments") for entry in reports[kind]["advice"]]
        reports[kind]["verdict"] = re.sub(r"; keys: .*$", "", reports[kind]["verdict"])
    assert all(w[0].startswith("MODEL.") for w in words["yaml"] if w)
    assert all(w.startswith("model.") and "=" in w for ws in words["py"] for w in ws)
    assert reports["py"] == reports["yaml"]
    assert _without_words(printed["py"]) == _without_words(printed["yaml"])


def _without_words(printed):
    """The printed report less the override words (and the verdict's list of keys)."""
    lines = [line for line in printed.splitlines()
             if not line.startswith("    ") and not line.startswith("  keys, after")]
    lines[0] = re.sub(r"; keys: .*$", "", lines[0])
    return lines


def test_printed_lazy_words_merge_into_the_py_config(tmp_path, capsys):
    """10x10 boxes half a stride off the P3 grid (the golden case of test_analyze_anchors.py):
    no anchor at stride 8 covers them, one level finer does. The key=value words printed for
    the .py config, applied through the tool's own loading (load_lazy_config, yacs_keys, the
    backbone instantiated and its anchors checked against the config's generator), give the
    coverage printed; the generator's strides and the bottom-up's out_features move with the
    levels, which YAML derives but a .py config states."""
    boxes = [[8 * i + 4 - 5, 8 * j + 4 - 5, 10, 10] for i in range(5, 45, 3) for j in (10, 30)]
    dataset = tmp_path / "tiny.json"
    dataset.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "height": 400, "width": 400}],
        "annotations": [{"id": k + 1, "image_id": 1, "bbox": b, "category_id": 1, "area": 100,
                         "iscrowd": 0} for k, b in enumerate(boxes)],
        "categories": [{"id": 1, "name": "cell"}],
    }))
    config = str(CONFIGS / "demo_deepforest_mobilenet_v2_fpn.py")
    opts = ["model.backbone.bottom_up.features.pretrained=False"]
    report = analyze_anchors.main(["--config-file", config, "--dataset", str(dataset),
                                   "--output", str(tmp_path / "out"), "--search-pairs", "200",
                                   *opts])
    printed = capsys.readouterr().out
    advised = report["advice"][report["advised"]]
    assert advised["foreground_pct"] == 100.0 and report["coverage"]["summary"][
        "foreground_pct"] == 0.0
    lines = printed.splitlines()
    start = 2 + next(i for i, line in enumerate(lines) if line.startswith(
        f"- {advised['title']}: 0.00% -> 100.00% (+100.00 points)") and line.endswith("ADVISED"))
    block = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        block.append(line.strip().rstrip("\\"))
    words = shlex.split(" ".join(block))
    assert {w.split("=")[0] for w in words} == {
        "model.backbone.in_features", "model.backbone.bottom_up.out_features",
        "model.head_in_features", "model.anchor_generator.sizes",
        "model.anchor_generator.strides"}
    assert printed.splitlines()[0].endswith("keys: " + ", ".join(w.split("=")[0] for w in words))
    cfg, backbone = analyze_anchors.setup(config, opts + words)
    again, _, _ = aa.analyze(cfg, [str(dataset)], propose=False, backbone=backbone)
    assert again["coverage"] == advised["coverage"]
    assert again["anchors"]["strides"] == [4, 8, 16, 32, 64]


def test_loss_cdf_of_a_lazy_config_equals_its_yaml_twins(data, tmp_path):
    yaml_opts, lazy_opts = _opts(data)
    cfg = load_config(str(CONFIGS / "demo_deepforest_mobilenet_v2_fpn.yaml"), yaml_opts[-4:])
    torch.manual_seed(0)
    weights = tmp_path / "weights.pth"
    RetinaNetCheckpointer(build_model(cfg), str(tmp_path)).save("weights")
    outputs = {}
    for kind, opts in (("yaml", yaml_opts), ("py", lazy_opts)):
        out = tmp_path / kind
        summary = loss_cdf.main([
            "--config-file", str(CONFIGS / f"demo_deepforest_mobilenet_v2_fpn.{kind}"),
            "--weights", str(weights), "--output", str(out), *opts,
        ])  # fmt: skip
        saved = json.loads((out / "loss_cdf.json").read_text())
        # The title names the config file: demo_deepforest_mobilenet_v2_fpn.{yaml,py} on ...
        assert saved.pop("title").startswith(f"demo_deepforest_mobilenet_v2_fpn.{kind} on")
        summary.pop("title")
        outputs[kind] = (summary, saved, (out / "loss_cdf.csv").read_text())
    assert outputs["yaml"][1]["samples"]["positive"] > 0
    # Bit-equal logits and labels: the same curves and shares, not close ones.
    assert outputs["py"] == outputs["yaml"]


# A .py config whose mappers do not resize runs images at their own size (train_net's lazy
# path, predict's test_min_size 0): its keys say so with detectron2's "no resize", 0.
NO_RESIZE_PY = ["dataloader.train.mapper.augmentations=[]",
                "dataloader.test.mapper.augmentations=[]"]
NO_RESIZE_YAML = ["INPUT.MIN_SIZE_TRAIN", "(0,)", "INPUT.MAX_SIZE_TRAIN", "0",
                  "INPUT.MIN_SIZE_TEST", "0", "INPUT.MAX_SIZE_TEST", "0"]


def _no_resize_opts(data):
    yaml, lazy = _opts(data)
    # _opts's datasets, no resize, the demo's overrides
    return yaml[:6] + NO_RESIZE_YAML + yaml[-4:], lazy[:3] + NO_RESIZE_PY + lazy[-2:]


def test_yacs_keys_of_a_config_without_resize_say_no_resize():
    keys = yacs_keys(load_lazy_config(str(CONFIGS / "demo_deepforest_mobilenet_v2_fpn.py"),
                                      NO_RESIZE_PY))
    assert keys.INPUT.MIN_SIZE_TEST == 0 and keys.INPUT.MAX_SIZE_TEST == 0
    assert tuple(keys.INPUT.MIN_SIZE_TRAIN) == (0,) and keys.INPUT.MAX_SIZE_TRAIN == 0
    assert keys.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"


def test_yacs_keys_refuse_a_resize_they_cannot_describe():
    cfg = load_lazy_config(str(CONFIGS / "demo_deepforest_mobilenet_v2_fpn.py"), [
        "dataloader.test.mapper.augmentations=[{_target_: detectron2.data.transforms.Resize,"
        " shape: [64, 64]}]",
    ])
    with pytest.raises(ValueError, match="dataloader.test.mapper resizes with Resize"):
        yacs_keys(cfg)


def test_analyze_anchors_without_resize_uses_the_images_own_size(data, tmp_path, capsys):
    yaml_opts, lazy_opts = _no_resize_opts(data)
    reports = {}
    for kind, opts in (("yaml", yaml_opts), ("py", lazy_opts)):
        reports[kind] = analyze_anchors.main([
            "--config-file", str(CONFIGS / f"demo_deepforest_mobilenet_v2_fpn.{kind}"),
            "--output", str(tmp_path / kind), "--search-pairs", "200", *opts,
        ])  # fmt: skip
        capsys.readouterr()
        reports[kind].pop("config_file")
        reports[kind]["histogram"] = reports[kind]["histogram"].replace(str(tmp_path / kind), "")
    assert reports["yaml"]["training_short_edges"] == [0]
    assert _without_syntax(reports["py"]) == _without_syntax(reports["yaml"])


def _without_syntax(report):
    """The report less what depends on the config's kind: its override words and the keys
    they name in the verdict."""
    report = json.loads(json.dumps(report))
    report.pop("syntax")
    for entry in report["advice"]:
        entry.pop("arguments")
    report["verdict"] = re.sub(r"; keys: .*$", "", report["verdict"])
    return report


def test_loss_cdf_without_resize_uses_the_images_own_size(data, tmp_path):
    yaml_opts, lazy_opts = _no_resize_opts(data)
    cfg = load_config(str(CONFIGS / "demo_deepforest_mobilenet_v2_fpn.yaml"), yaml_opts[-4:])
    torch.manual_seed(0)
    RetinaNetCheckpointer(build_model(cfg), str(tmp_path)).save("weights")
    outputs = {}
    for kind, opts in (("yaml", yaml_opts), ("py", lazy_opts)):
        summary = loss_cdf.main([
            "--config-file", str(CONFIGS / f"demo_deepforest_mobilenet_v2_fpn.{kind}"),
            "--weights", str(tmp_path / "weights.pth"), "--output", str(tmp_path / kind), *opts,
        ])  # fmt: skip
        summary.pop("title")
        outputs[kind] = summary
    assert outputs["py"] == outputs["yaml"]
    # 64x80 images, not resized: the anchors of a 64x80 input, not of an 800 px one
    resized = loss_cdf.main([
        "--config-file", str(CONFIGS / "demo_deepforest_mobilenet_v2_fpn.py"),
        "--weights", str(tmp_path / "weights.pth"), "--output", str(tmp_path / "resized"),
        *lazy_opts[:4], *lazy_opts[-2:],
        "dataloader.test.mapper.augmentations.0.short_edge_length=128",
    ])  # fmt: skip
    resized.pop("title")
    assert resized != outputs["py"]
