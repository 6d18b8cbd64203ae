# RetinaNet ResNeXt-101-32x8d-FPN, 270k iterations: retinanet_X_101_32x8d_FPN_3x.yaml as a lazy
# config, from FAIR's ImageNet ResNeXt.
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BottleneckBlock, ResNet

from .retinanet_R_50_FPN_3x import (  # noqa: F401  (the config's keys)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# ResNet.make_default_stages gives each stage out_channels / 4 bottleneck channels (ResNet);
# ResNeXt 32x8d has 32 groups of 8 channels in res2, doubling at each stage, as detectron2's
# build_resnet_backbone makes it from RESNETS.NUM_GROUPS and WIDTH_PER_GROUP.
model.backbone.bottom_up.stages = [
    L(ResNet.make_stage)(
        block_class=BottleneckBlock,
        num_blocks=num_blocks,
        stride_per_block=[stride] + [1] * (num_blocks - 1),
        in_channels=in_channels,
        bottleneck_channels=32 * 8 * 2**i,
        out_channels=256 * 2**i,
        num_groups=32,
        norm="FrozenBN",
        stride_in_1x1=False,  # a Caffe2 model: stride in the 3x3 conv
    )
    for i, (num_blocks, stride, in_channels) in enumerate(
        [(3, 1, 64), (4, 2, 256), (23, 2, 512), (3, 2, 1024)]
    )
]
model.pixel_std = [57.375, 57.120, 58.395]  # this model was trained with ImageNet's std (BGR)
train.init_checkpoint = "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl"
