"""The tools with a Python (lazy) config: load_cfg, and export's same graph as with its YAML
twin (predict: test_lazy_predict.py; analyze_anchors, loss_cdf: test_lazy_anchor_tools.py)."""

from pathlib import Path

import pytest
import torch

from detectron2.modeling import build_model

from retinanet_plugin import RetinaNetCheckpointer
from retinanet_plugin.config import load_config
from retinanet_plugin.export import load_exported
from retinanet_plugin.tools import export as export_tool
from retinanet_plugin.tools.model_setup import load_cfg

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.yaml"
LAZY = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.py"
# Random weights, every candidate kept (near-prior scores), on both kinds.
YAML_OPTS = ["MODEL.MOBILENET.PRETRAINED", "False", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
LAZY_OPTS = ["model.backbone.bottom_up.features.pretrained=False", "model.test_score_thresh=0.0"]


@pytest.fixture(autouse=True)
def eager_focal_loss(monkeypatch):
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights of the YAML demo model (the lazy twin has the same parameter names)."""
    cfg = load_config(str(YAML), YAML_OPTS)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lazy_tools") / "weights"
    RetinaNetCheckpointer(build_model(cfg), str(path.parent)).save(path.name)
    return str(path) + ".pth"


def test_load_cfg_reads_both_kinds_with_the_same_keys(weights):
    ycfg = load_cfg(str(YAML), YAML_OPTS, weights=weights, device="cpu", score_thresh=0.25)
    cfg = load_cfg(str(LAZY), LAZY_OPTS, weights=weights, device="cpu", score_thresh=0.25,
                   lazy=True)
    assert (cfg.train.init_checkpoint, cfg.train.device, cfg.model.test_score_thresh) == (
        ycfg.MODEL.WEIGHTS, ycfg.MODEL.DEVICE, ycfg.MODEL.RETINANET.SCORE_THRESH_TEST
    )
    # A tool that has not opted in refuses a .py by name.
    with pytest.raises(ValueError, match="my_tool takes a YAML config"):
        load_cfg(str(LAZY), LAZY_OPTS, tool="my_tool")


@pytest.mark.parametrize("export_format", ["torchscript"])
def test_export_of_a_lazy_config_equals_its_yaml_twins(weights, tmp_path, export_format):
    outputs = {}
    for name, config, opts in (("yaml", YAML, YAML_OPTS), ("lazy", LAZY, LAZY_OPTS)):
        out = tmp_path / f"{name}.pt"
        # The single-image graph, run below on the test loader's resized images.
        argv = ["--config-file", str(config), "--weights", weights, "--format", export_format,
                "--input", "resized", "--output", str(out), *opts]
        assert export_tool.main(argv) == 0, name
        outputs[name] = load_exported(str(out), export_format)
    cfg = load_cfg(str(YAML), YAML_OPTS, weights=weights)
    images = export_tool.check_images(cfg, [])
    lazy_images = export_tool.check_images(load_cfg(str(LAZY), LAZY_OPTS, lazy=True), [])
    assert all(torch.equal(a, b) for a, b in zip(images, lazy_images))  # same test size
    for image in images:
        ours, theirs = outputs["lazy"](image), outputs["yaml"](image)
        assert len(theirs[0]) > 0  # detections to compare
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
