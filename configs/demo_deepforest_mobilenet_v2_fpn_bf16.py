# `make demo` on a CPU with AVX-512 BF16 or AMX, as a lazy config
# (demo_deepforest_mobilenet_v2_fpn_bf16.yaml): the demo recipe trained in bfloat16 mixed
# precision with channels-last tensors, for 900 steps instead of 600 in the same wall-clock
# budget. Checkpoints and evaluation stay float32.
from .demo_deepforest_mobilenet_v2_fpn_long import (  # noqa: F401  (the config's keys)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.channels_last = True
train.amp.enabled = True
train.amp.precision = "bfloat16"

train.max_iter = 900  # 3600 images, about 55 passes over the 66 training tiles
lr_multiplier.scheduler.milestones = [720, 840]  # the float32 recipe's 80% and 93% of training
lr_multiplier.scheduler.num_updates = 900
lr_multiplier.warmup_length = 50 / 900
