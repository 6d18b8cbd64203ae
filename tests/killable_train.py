"""Runs train_net.py's main, stopping at a chosen point so that a test can SIGKILL it there.

Used by tests/test_killed_runs.py as ``python tests/killable_train.py <train_net.py args>``.
Environment:
    KILL_AT: where to stop, one of
        "step:<iteration>"  inside that iteration's forward pass (mid-step);
        "save:<basename>"   inside the save of that checkpoint, after its temporary file is
                            written and fsync'ed, before the rename (os.replace) puts it in place;
        "tagged:<basename>" right after that checkpoint is complete and last_checkpoint names it.
    KILL_MARKER: file written when the point is reached (then the process sleeps, waiting for
        the kill).
    TINY_DATASET: "<name>:<coco json>:<image root>" registered before training.
"""

import importlib.util
import os
import sys
import time
from pathlib import Path

import detectron2
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from detectron2.utils.events import get_event_storage

from retinanet_plugin import FocalRetinaNet, RetinaNetCheckpointer

REPO = Path(__file__).resolve().parents[1]


def _stop_here(detail: str) -> None:
    Path(os.environ["KILL_MARKER"]).write_text(detail)
    time.sleep(600)  # the test kills the process long before
    sys.exit("killable_train: was not killed")


def _install(kill_at: str) -> None:
    kind, _, where = kill_at.partition(":")
    if kind == "step":
        forward = FocalRetinaNet.forward

        def forward_then_stop(self, batched_inputs):
            if self.training and get_event_storage().iter == int(where):
                _stop_here(f"step {where}")
            return forward(self, batched_inputs)

        FocalRetinaNet.forward = forward_then_stop
    elif kind == "save":
        replace = os.replace

        def stop_before_rename(src, dst, **kwargs):
            if os.path.basename(dst) == where:
                _stop_here(str(src))
            return replace(src, dst, **kwargs)

        os.replace = stop_before_rename
    elif kind == "tagged":
        tag = RetinaNetCheckpointer.tag_last_checkpoint

        def tag_then_stop(self, basename):
            tag(self, basename)
            if basename == where:
                _stop_here(basename)

        RetinaNetCheckpointer.tag_last_checkpoint = tag_then_stop
    else:
        raise ValueError(f"KILL_AT must be step:N, save:NAME or tagged:NAME, got {kill_at!r}")


def main() -> None:
    # The test checks that this is the detectron2 it runs itself.
    print(f"killable_train: detectron2 from {os.path.dirname(detectron2.__file__)}", flush=True)
    name, json_file, image_root = os.environ["TINY_DATASET"].split(":")
    register_coco_instances(name, {"thing_classes": ["Tree"]}, json_file, image_root)
    _install(os.environ["KILL_AT"])
    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    train_net.main(default_argument_parser().parse_args(sys.argv[1:]))


if __name__ == "__main__":
    main()
