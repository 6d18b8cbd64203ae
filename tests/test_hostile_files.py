"""Crafted checkpoints and configs that would run code on load are refused; real ones load.

Each crafted file runs ``os.system("touch <canary>")`` when loaded the unsafe way (shown by the
first assertion of each test, which loads it as detectron2 / torch would without the
protections); through the project's loaders it raises an error naming the file, and the canary
file is never created.
"""

import os
import pickle

import numpy as np
import pytest
import torch
from test_train_net import TINY, _args, _load_train_net, datasets_dir
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.solver import WarmupMultiStepLR

from retinanet_plugin import RetinaNetCheckpointer, add_retinanet_plugin_config
from retinanet_plugin.checkpoint import UnsafeCheckpointError, load_pickle_safely
from retinanet_plugin.config import load_config_file

__all__ = ["datasets_dir"]  # the fixture, shared with test_train_net.py


class _RunsCode:
    """Pickles to a call of os.system: what a malicious checkpoint holds."""

    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "code_ran"
    assert not path.exists()
    return path


def _crafted_pth(tmp_path, canary):
    path = tmp_path / "crafted.pth"
    torch.save({"model": _model().state_dict(), "evil": _RunsCode(canary)}, path)
    return path


def _crafted_pkl(tmp_path, canary):
    path = tmp_path / "crafted.pkl"
    weights = {"conv.weight": np.zeros((4, 3, 3, 3), np.float32)}
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "x", "evil": _RunsCode(canary)}, f)
    return path


def test_crafted_pth_is_refused(tmp_path, canary):
    path = _crafted_pth(tmp_path, canary)
    torch.load(path, weights_only=False)  # the unsafe way runs the code
    assert canary.exists()
    canary.unlink()

    refused = r"(?s)Refusing to load .*crafted\.pth.*\w+\.system"
    with pytest.raises(UnsafeCheckpointError, match=refused):
        RetinaNetCheckpointer(_model()).load(str(path))
    assert not canary.exists()


def test_crafted_pkl_is_refused(tmp_path, canary):
    path = _crafted_pkl(tmp_path, canary)
    with open(path, "rb") as f:
        pickle.load(f)  # the unsafe way (detectron2's DetectionCheckpointer) runs the code
    assert canary.exists()
    canary.unlink()

    with pytest.raises(UnsafeCheckpointError, match=r"crafted\.pkl: it names \w+\.system"):
        RetinaNetCheckpointer(_model()).load(str(path))
    with pytest.raises(UnsafeCheckpointError, match="crafted.pkl"):
        load_pickle_safely(str(path))
    assert not canary.exists()


def test_crafted_checkpoint_refused_by_train_net(datasets_dir, tmp_path, canary):
    """train_net.py --eval-only with MODEL.WEIGHTS; the trainer with MODEL.WEIGHTS (.pth, .pkl)
    and with --resume."""
    train_net = _load_train_net()
    pth = _crafted_pth(tmp_path, canary)
    out = tmp_path / "out"
    data = ["DATASETS.TRAIN", f"('{TINY}',)", "DATASETS.TEST", "()"]
    with pytest.raises(UnsafeCheckpointError, match="crafted.pth"):
        train_net.main(_args(out, "MODEL.WEIGHTS", str(pth), *data, eval_only=True))

    trainer = train_net.Trainer(train_net.setup(_args(out, "MODEL.WEIGHTS", str(pth), *data)))
    # The trainer's checkpointer is ours, and the PeriodicCheckpointer hook saves through it.
    assert type(trainer.checkpointer) is RetinaNetCheckpointer
    assert any(getattr(h, "checkpointer", None) is trainer.checkpointer for h in trainer._hooks)
    with pytest.raises(UnsafeCheckpointError, match="crafted.pth"):
        trainer.resume_or_load(resume=False)  # MODEL.WEIGHTS
    os.replace(pth, out / "model_0000009.pth")
    (out / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(UnsafeCheckpointError, match="model_0000009.pth"):
        trainer.resume_or_load(resume=True)  # --resume
    pkl = _crafted_pkl(tmp_path, canary)
    trainer.cfg.defrost()
    trainer.cfg.MODEL.WEIGHTS = str(pkl)
    with pytest.raises(UnsafeCheckpointError, match="crafted.pkl"):
        trainer.resume_or_load(resume=False)
    assert not canary.exists()


def test_real_checkpoints_still_load(tmp_path):
    """A DetectionCheckpointer save with optimizer, scheduler and iteration (what resuming
    reads), numpy values in a .pth, and a .pkl in the model-zoo layout."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = WarmupMultiStepLR(optimizer, milestones=[2], warmup_iters=1)
    for _ in range(3):
        model[0].weight.sum().backward()
        optimizer.step()
        scheduler.step()
    DetectionCheckpointer(
        model, str(tmp_path), optimizer=optimizer, scheduler=scheduler
    ).save("model_0000002", iteration=2, numpy_value=np.float32(0.5))

    fresh = _model()
    with torch.no_grad():
        fresh[0].weight.zero_()
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    sched2 = WarmupMultiStepLR(opt2, milestones=[2], warmup_iters=1)
    extra = RetinaNetCheckpointer(fresh, str(tmp_path), optimizer=opt2, scheduler=sched2).load(
        str(tmp_path / "model_0000002.pth")
    )
    assert extra == {"iteration": 2, "numpy_value": np.float32(0.5)}
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert torch.equal(
        opt2.state_dict()["state"][0]["momentum_buffer"],
        optimizer.state_dict()["state"][0]["momentum_buffer"],
    )

    # Model-zoo .pkl: {"model": {name: ndarray}, "__author__": ...}, pickled as detectron2's
    # conversion scripts do, and by Python 2 (protocol 2, read back with latin1).
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"zoo_{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": weights, "__author__": "model zoo"}, f, protocol=protocol)
        loaded = _model()
        RetinaNetCheckpointer(loaded).load(str(path))
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (protocol, key)


CRAFTED_YAML = """\
MODEL:
  META_ARCHITECTURE: !!python/object/apply:os.system ["touch {canary}"]
"""


def _cfg():
    cfg = get_cfg()
    add_retinanet_plugin_config(cfg)
    return cfg


def test_crafted_config_is_refused(tmp_path, canary):
    crafted = tmp_path / "crafted.yaml"
    crafted.write_text(CRAFTED_YAML.format(canary=canary))
    with pytest.raises(Exception):  # noqa: B017 -- detectron2's loader runs the code, then fails
        _cfg().merge_from_file(str(crafted))
    assert canary.exists()
    canary.unlink()

    with pytest.raises(ValueError, match=r"Config file .*crafted\.yaml .* refused"):
        load_config_file(_cfg(), str(crafted))
    # Also when the tag hides in a _BASE_ file, and through train_net.py's setup().
    variant = tmp_path / "variant.yaml"
    variant.write_text("_BASE_: crafted.yaml\nSOLVER:\n  MAX_ITER: 3\n")
    with pytest.raises(ValueError, match=r"variant\.yaml \(or one of its _BASE_ files\)"):
        load_config_file(_cfg(), str(variant))
    with pytest.raises(ValueError, match="crafted.yaml"):
        args = default_argument_parser().parse_args(["--config-file", str(crafted)])
        _load_train_net().setup(args)
    assert not canary.exists()


def test_model_zoo_config_with_arithmetic_eval_loads_as_detectron2_loads_it():
    # detectron2's Base-RetinaNet.yaml writes its anchor sizes with !!python/object/apply:eval;
    # refusing every tag refused detectron2's own RetinaNet configs.
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    ours = load_config_file(_cfg(), path)
    theirs = _cfg()
    theirs.merge_from_file(path)
    assert ours.dump() == theirs.dump()
    assert ours.MODEL.ANCHOR_GENERATOR.SIZES[0][1] == pytest.approx(32 * 2 ** (1 / 3))


@pytest.mark.parametrize("expression", [
    "__import__('os').system('touch {canary}')",
    "[x for x in open('{canary}', 'w')]",
    "[(lambda: 1)()]",
    "[[x] for x in [1, 2] if print('{canary}')]",
    "'touch {canary}'",
    "[0] * 10 ** 12",  # a list repeated: memory, not arithmetic
    "[[2 ** 100000]]",  # an integer far beyond any config value
    "[[9 ** 9 ** 2]]",  # 9 ** 81: 257 bits (the bound is 128; tests/test_config_reader.py)
])
def test_eval_tag_other_than_arithmetic_is_refused(tmp_path, canary, expression):
    crafted = tmp_path / "base.yaml"
    crafted.write_text('MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: !!python/object/apply:eval '
                       f'["{expression.format(canary=canary)}"]\n')
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: base.yaml\n")
    for path in (crafted, child):
        with pytest.raises(ValueError, match=r"base\.yaml|child\.yaml"):
            load_config_file(_cfg(), str(path))
    assert not canary.exists()


def test_base_that_cannot_be_scanned_is_loaded_without_the_unsafe_fallback(tmp_path, canary,
                                                                             monkeypatch):
    # A _BASE_ the scan cannot read (a URL detectron2's file system would fetch) must not be
    # loaded with yaml.unsafe_load: the tag in it fails to load instead of running.
    from detectron2.utils.file_io import PathManager

    remote = tmp_path / "remote.yaml"
    remote.write_text(CRAFTED_YAML.format(canary=canary))
    real_open, real_isfile = PathManager.open, PathManager.isfile

    def fetch(path, *args, **kwargs):  # the "URL" is served from the local file
        return real_open(str(remote) if path.startswith("https://") else path, *args, **kwargs)

    monkeypatch.setattr(PathManager, "open", fetch)
    monkeypatch.setattr(PathManager, "isfile",
                        lambda path: path.startswith("https://") or real_isfile(path))
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: https://example.org/remote.yaml\n")
    with pytest.raises(ValueError, match=r"child\.yaml .* refused"):
        load_config_file(_cfg(), str(child))
    assert not canary.exists()


def test_tools_load_configs_safely(tmp_path, canary):
    """predict / export (model_setup.load_cfg), analyze_anchors and loss_cdf share
    ``retinanet_plugin.config.load_config``: a crafted config is refused by each."""
    from retinanet_plugin.tools import analyze_anchors, loss_cdf, model_setup

    crafted = tmp_path / "crafted.yaml"
    crafted.write_text(CRAFTED_YAML.format(canary=canary))
    with pytest.raises(ValueError, match="crafted.yaml"):
        model_setup.load_cfg(str(crafted))
    with pytest.raises(ValueError, match="crafted.yaml"):
        analyze_anchors.setup_cfg(str(crafted), [])
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="crafted.yaml"):
        loss_cdf.main(["--config-file", str(crafted), "--weights", str(weights)])
    assert not canary.exists()
