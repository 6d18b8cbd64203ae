"""A checkpointer that refuses checkpoints trained for another number of classes."""

from detectron2.checkpoint import DetectionCheckpointer

from .head import FocalRetinaNetHead

__all__ = ["RetinaNetCheckpointer"]


class RetinaNetCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` that raises when a head's ``cls_score`` does not fit.

    detectron2's checkpointer drops every checkpoint tensor whose shape differs from the model's
    and only logs a warning, which is what fine-tuning to a new dataset wants, but for evaluation
    or resuming it silently leaves ``cls_score`` at its random initialisation when
    ``MODEL.RETINANET.NUM_CLASSES`` differs from the checkpoint's. Use this class wherever the
    checkpoint is meant to fit (evaluation, export, resuming) and detectron2's
    ``DetectionCheckpointer`` to fine-tune.

    The check runs after detectron2's key renaming (so it covers Detectron1 / pycls pickles too),
    on the keys of every :class:`FocalRetinaNetHead` in the model; the ValueError is raised before
    the model can be used, though its other weights may already be loaded.
    """

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        wrong_shapes = {key: shape for key, shape, _ in incompatible.incorrect_shapes}
        for name, module in self.model.named_modules():
            if not isinstance(module, FocalRetinaNetHead):
                continue
            for param in ("weight", "bias"):
                key = f"{name}.cls_score.{param}" if name else f"cls_score.{param}"
                if key in wrong_shapes:
                    module.check_cls_score_shape(key, wrong_shapes[key])
        return incompatible
