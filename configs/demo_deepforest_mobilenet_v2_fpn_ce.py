# demo_deepforest_mobilenet_v2_fpn_ce.yaml as a lazy config: the CPU demo with plain
# cross-entropy instead of focal loss, gamma = 0 and no alpha weighting, the prior
# initialisation (pi = 0.01, Sec. 3.3) kept so that training does not diverge.
from .demo_deepforest_mobilenet_v2_fpn import (  # noqa: F401  (the config's keys)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.focal_loss_gamma = 0.0
model.focal_loss_alpha = -1.0  # no alpha-balancing
train.output_dir = "output/demo_ce"
