"""What the summed detection losses are divided by: the number of foreground anchors.

The paper normalises the total focal loss of an image by the number of anchors assigned to a
ground-truth box, not by the number of anchors (Sec. 3.3, "Class Imbalance and Model
Initialization"; Sec. 4, "Focal Loss"), since the vast majority of anchors are easy negatives with
negligible loss under FL.
"""

import torch
import torch.distributed as dist

from detectron2.utils import comm

__all__ = ["LossNormalizer", "build_loss_normalizer"]


class LossNormalizer:
    """Turns this step's foreground-anchor count into the loss divisor.

    Modes:
        "ema": detectron2's. An exponential moving average, per process, of max(num_fg, 1),
            starting from ``initial_value``. With one or two images per GPU the raw count varies a
            lot from step to step; averaging it steadies the effective learning rate.
        "batch": this step's max(num_fg, 1) in this process.
        "global": this step's foreground count over all processes, divided by the world size.
            DDP averages gradients over processes, so dividing each process's summed loss by
            sum_p num_fg_p / world_size makes the update that of the whole global batch divided
            by its foreground count, as in the paper, whatever the number of GPUs.

    The EMA is the only state. Like detectron2's, it is not saved in checkpoints: a resumed run
    restarts it from ``initial_value``.
    """

    MODES = ("ema", "batch", "global")

    def __init__(self, mode: str = "ema", *, momentum: float = 0.9, initial_value: float = 100.0):
        """
        Args:
            mode (str): one of :attr:`MODES`.
            momentum (float): EMA momentum in [0, 1); the weight of the previous value.
            initial_value (float): the EMA before the first step; > 0.
        """
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not initial_value > 0:
            raise ValueError(f"initial_value must be > 0, got {initial_value}")
        self.mode = mode
        self.momentum = momentum
        self.value = float(initial_value)

    def __call__(self, num_foreground: int, device: torch.device) -> float:
        """Return the divisor for this step.

        Args:
            num_foreground (int): foreground anchors in this process's minibatch.
            device (torch.device): where the all-reduce of "global" runs (the model's device,
                as NCCL needs CUDA tensors).

        Returns:
            float: the normaliser, >= 1 for "ema" and "batch", >= 1 / world size for "global".
        """
        count = max(float(num_foreground), 1.0)
        if self.mode == "batch":
            return count
        if self.mode == "ema":
            self.value = self.value * self.momentum + count * (1 - self.momentum)
            return self.value
        world_size = comm.get_world_size()
        if world_size == 1:
            return count
        total = torch.tensor(float(num_foreground), device=device)
        dist.all_reduce(total)
        return max(total.item(), 1.0) / world_size

    def __repr__(self) -> str:
        return f"LossNormalizer(mode={self.mode!r}, momentum={self.momentum}, value={self.value})"


def build_loss_normalizer(cfg) -> LossNormalizer:
    """The normaliser of ``MODEL.RETINANET.LOSS_NORMALIZER`` / ``_MOMENTUM`` / ``_INIT``.

    Shared by FocalRetinaNet and FocalRPN (which reads the same keys), so that a bad value is
    refused with the name of the key to change rather than a constructor argument's.
    """
    rcfg = cfg.MODEL.RETINANET
    if rcfg.LOSS_NORMALIZER not in LossNormalizer.MODES:
        raise ValueError(
            f"MODEL.RETINANET.LOSS_NORMALIZER = {rcfg.LOSS_NORMALIZER!r} is not one of "
            f"{list(LossNormalizer.MODES)}"
        )
    if not 0 <= rcfg.LOSS_NORMALIZER_MOMENTUM < 1:
        raise ValueError(
            "MODEL.RETINANET.LOSS_NORMALIZER_MOMENTUM must be in [0, 1), got "
            f"{rcfg.LOSS_NORMALIZER_MOMENTUM}"
        )
    if not rcfg.LOSS_NORMALIZER_INIT > 0:
        raise ValueError(
            f"MODEL.RETINANET.LOSS_NORMALIZER_INIT must be > 0, got {rcfg.LOSS_NORMALIZER_INIT}"
        )
    return LossNormalizer(
        rcfg.LOSS_NORMALIZER,
        momentum=rcfg.LOSS_NORMALIZER_MOMENTUM,
        initial_value=rcfg.LOSS_NORMALIZER_INIT,
    )
