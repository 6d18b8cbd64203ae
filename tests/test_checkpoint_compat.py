"""RetinaNetCheckpointer behaves as detectron2's checkpointer on both detectron2 versions the
project supports (the 2022 snapshot 0.6 and upstream), and resumes checkpoints across them.

Upstream's DetectionCheckpointer records the path being loaded (``_parsed_url_during_load``) and
reads the path's query (``?matching_heuristics=True``); 0.6 does neither.
"""

from collections import OrderedDict

import pytest
import torch
from test_train_net import TINY, _args, _load_train_net, datasets_dir
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer

from retinanet_plugin import RetinaNetCheckpointer
from retinanet_plugin.checkpoint import UnsafeCheckpointError

__all__ = ["datasets_dir"]  # the fixture, shared with test_train_net.py

# Upstream reads .pth files through this method (added with the path queries, 2023).
UPSTREAM = hasattr(DetectionCheckpointer, "_torch_load")


class _NotData:
    """Pickled as a reference to this class: not plain data, so weights-only loading refuses it
    (harmlessly: it runs no code)."""


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))


@pytest.mark.parametrize("failure", ["refused", "missing"])
def test_checkpointer_loads_again_after_a_failed_load(tmp_path, failure):
    """A refused (or missing) file raises; the same checkpointer then loads a good file (upstream
    detectron2 asserted at that second load)."""
    good = tmp_path / "good.pth"
    torch.save({"model": _model(1).state_dict()}, good)
    bad = tmp_path / "bad.pth"
    if failure == "refused":
        torch.save({"model": _model(2).state_dict(), "extra": _NotData()}, bad)
    model = _model(0)
    checkpointer = RetinaNetCheckpointer(model)
    expected_error = UnsafeCheckpointError if failure == "refused" else (AssertionError, OSError)
    with pytest.raises(expected_error):
        checkpointer.load(str(bad))
    checkpointer.load(str(good))
    for key, value in _model(1).state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.skipif(not UPSTREAM, reason="detectron2 0.6 reads no query in checkpoint paths")
def test_matching_heuristics_query_is_honoured(tmp_path):
    """``file.pth?matching_heuristics=True`` matches keys by suffix, as upstream's checkpointer
    does (here the model nests the checkpoint's modules under "backbone.")."""
    source = _model(1).state_dict()
    path = tmp_path / "unprefixed.pth"
    torch.save({"model": source}, path)

    plain = nn.Sequential(OrderedDict(backbone=_model(0)))
    RetinaNetCheckpointer(plain).load(str(path))
    assert not torch.equal(plain.backbone.state_dict()["1.weight"], source["1.weight"])  # unmatched

    matched = nn.Sequential(OrderedDict(backbone=_model(0)))
    RetinaNetCheckpointer(matched).load(f"{path}?matching_heuristics=True")
    for key, value in source.items():
        assert torch.equal(matched.backbone.state_dict()[key], value), key


def _in_other_layout(checkpoint):
    """The checkpoint as the other detectron2 version writes it: detectron2 0.6's trainer saves no
    optimizer (the project's trainer saves it as "optimizer" beside "trainer"); later versions
    save it inside the trainer's state, as trainer["_trainer"]["optimizer"]."""
    trainer = checkpoint["trainer"]
    if "_trainer" in trainer:
        checkpoint["optimizer"] = trainer.pop("_trainer")["optimizer"]
    else:
        optimizer = checkpoint.pop("optimizer")
        trainer["_trainer"] = {"iteration": trainer["iteration"], "optimizer": optimizer}
    return checkpoint


def _momenta(optimizer_state):
    return [state["momentum_buffer"] for _, state in sorted(optimizer_state["state"].items())]


def test_resume_reads_the_other_detectron2_versions_checkpoint(datasets_dir, tmp_path):
    """A run killed under one detectron2 and resumed under the other restores its optimizer:
    upstream raised KeyError '_trainer' on a 0.6 checkpoint; 0.6 silently restarted the SGD
    momentum of an upstream one."""
    train_net = _load_train_net()
    out = tmp_path / "run"
    opts = ["DATASETS.TRAIN", f"('{TINY}',)", "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "2"]
    train_net.main(_args(out, *opts))
    path = out / "model_final.pth"
    written = torch.load(path, map_location="cpu", weights_only=True)
    optimizer = written.get("optimizer") or written["trainer"]["_trainer"]["optimizer"]
    expected = _momenta(optimizer)
    assert expected and all(m.abs().sum() > 0 for m in expected)  # SGD with momentum took steps
    torch.save(_in_other_layout(written), path)

    trainer = train_net.Trainer(train_net.setup(_args(out, *opts, resume=True)))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    restored = _momenta(trainer.optimizer.state_dict())
    assert len(restored) == len(expected)
    for got, want in zip(restored, expected):
        assert torch.equal(got, want)
