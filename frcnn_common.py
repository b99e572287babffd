"""Faster R-CNN from scratch: the code that the notebooks explain.

One section per notebook, in notebook order:

    01 data        embedded dataset, COCO / VOC readers, transforms, batching
    02 backbone    Bottleneck, ResNet50, FPN
    03 rpn         anchors, box coding, matching, sampling, RPN head and loss, NMS, proposals
    04 roi heads   RoIAlign, level mapping, box head, predictor, RoI sampling and loss, FasterRCNN
    05 training    profiles, training loop, checkpoints, DDP
    06 inference   detection, COCO evaluation (pycocotools and from scratch), prediction
    CLI            python -m frcnn_common data | train | evaluate | predict

Conventions, said once:
- Boxes are (x1, y1, x2, y2) in absolute pixels ("xyxy"), float32.
- Images are FloatTensor[3, H, W] with RGB values in 0..1.
- Labels are int64 in 1..K; 0 is background.
- Shape shorthand: N images, C channels, H x W a feature map, A anchors per location,
  R RoIs (proposals), K classes including background, G ground-truth boxes.
- Tensors are named pred_* / gt_*, *_logits, *_deltas, num_*.

The model runs on this module alone. torchvision appears only as a source of pretrained
weights (``load_torchvision_state_dict``) and, in the tests and benchmarks, as the reference.
"""
from __future__ import annotations

import math
import os
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMG_SIZE = 400  # the side the notebooks use to show shapes; the detector itself resizes (min_size)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = pathlib.Path(__file__).resolve().parent

# ImageNet statistics: every torchvision backbone was trained on images normalised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# =============================================================================================
# 02 backbone: Bottleneck, ResNet50, FPN
# =============================================================================================
"""Section 02. ResNet50 (He et al., 2016) turns an image into four feature maps, and the
Feature Pyramid Network (Lin et al., 2017) gives each of them 256 channels and the
semantics of the deepest one.

    image  (N, 3, H, W)
    C2     (N, 256,  H/4,  W/4)     layer1, stride 4
    C3     (N, 512,  H/8,  W/8)     layer2, stride 8
    C4     (N, 1024, H/16, W/16)    layer3, stride 16
    C5     (N, 2048, H/32, W/32)    layer4, stride 32
    P2..P5 (N, 256, same sizes as C2..C5);  P6 (N, 256, ceil(H/64), ceil(W/64))

Parameter names follow torchvision's resnet50 (conv1, bn1, layer1.0.conv1, ...
layer1.0.downsample.0) so that its ImageNet weights load key for key.
"""


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters: y = x * scale + shift.

    Detection trains with 1-2 images per GPU; batch statistics over so few images are noise,
    so detectors keep the ImageNet statistics frozen (Detectron, torchvision). All four
    tensors are buffers: the optimizer never sees them.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A BatchNorm2d state dict carries a step counter that frozen statistics have no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        # Same arithmetic order as torchvision's FrozenBatchNorm2d, so outputs agree bit for bit.
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Bottleneck(nn.Module):
    """ResNet bottleneck block (He et al., 2016, Fig. 5 right), in the "v1.5" form that puts the
    stride on the 3x3 conv:  1x1 (mid) -> 3x3 (mid, stride) -> 1x1 (4*mid), plus the shortcut.

        x (N, in_ch, H, W) -> (N, 4*mid_ch, H/stride, W/stride)
    """

    expansion = 4

    def __init__(self, in_ch: int, mid_ch: int, stride: int = 1, downsample: nn.Module | None = None,
                 *, norm_layer=nn.BatchNorm2d):
        super().__init__()
        out_ch = mid_ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, bias=False)
        self.bn1 = norm_layer(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(mid_ch)
        self.conv3 = nn.Conv2d(mid_ch, out_ch, 1, bias=False)
        self.bn3 = norm_layer(out_ch)
        self.downsample = downsample  # projects the shortcut when the shape changes

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet of bottleneck blocks that returns C2..C5 (no pooling head, no classifier).

    `blocks` are the block counts of layer1..layer4 and `width` the stem's channels; ResNet50
    is blocks=(3, 4, 6, 3), width=64. Narrower or shallower members of the same family
    (the `cpu` profile's backbone) keep the layout, so everything downstream is unchanged.
    """

    def __init__(self, blocks=(3, 4, 6, 3), *, width: int = 64, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        in_ch = width
        stages = []
        for i, num_blocks in enumerate(blocks):
            mid_ch, stride = width * 2**i, (1 if i == 0 else 2)
            out_ch = mid_ch * Bottleneck.expansion
            downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                       norm_layer(out_ch))
            layer = [Bottleneck(in_ch, mid_ch, stride, downsample, norm_layer=norm_layer)]
            layer += [Bottleneck(out_ch, mid_ch, norm_layer=norm_layer) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*layer))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = [width * 2**i * Bottleneck.expansion for i in range(4)]  # C2..C5

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))                   # (N, width, H/2, W/2)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)  # (N, width, H/4, W/4)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5

    def freeze(self, trainable_layers: int) -> "ResNet":
        """Freeze all but the last `trainable_layers` of (layer4, layer3, layer2, layer1, stem),
        as detectors do with a pretrained backbone: the early filters are generic edges and
        colours, and fine-tuning them on a small detection set only costs memory and time."""
        names = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            names.append("bn1")
        for name, param in self.named_parameters():
            param.requires_grad_(any(name.startswith(n) for n in names))
        return self

    def load_torchvision_state_dict(self, state_dict: dict) -> "ResNet":
        """Load torchvision's resnet weights strictly; its classifier (`fc.*`) is dropped."""
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        if not any(isinstance(m, nn.BatchNorm2d) for m in self.modules()):
            state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
        self.load_state_dict(state_dict, strict=True)
        return self


class ResNet50(ResNet):
    """ResNet50: 3, 4, 6 and 3 bottlenecks; 23,508,032 parameters without the classifier."""

    def __init__(self, *, norm_layer=nn.BatchNorm2d):
        super().__init__((3, 4, 6, 3), width=64, norm_layer=norm_layer)


class FPN(nn.Module):
    """Feature Pyramid Network (Lin et al., 2017, Sec. 3), P2..P6 from C2..C5.

    Top-down: P5' = lateral(C5); Pk' = lateral(Ck) + upsample_nearest(P(k+1)') for k = 4, 3, 2;
    Pk = output(Pk') (a 3x3 conv that smooths the upsampling's aliasing);
    P6 = max-pool(P5, kernel 1, stride 2): a subsampled P5 that gives the largest anchors
    (512) a coarse level of their own (as in the FPN paper's RPN).
    """

    def __init__(self, in_channels=(256, 512, 1024, 2048), out_channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                    for _ in in_channels)
        self.p6 = nn.MaxPool2d(kernel_size=1, stride=2, padding=0)
        self.out_channels = out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # Kaiming-uniform (a=1) weights, zero biases, as torchvision
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features) -> tuple[Tensor, ...]:
        """features: C2..C5 -> (P2, P3, P4, P5, P6), all with `out_channels` channels."""
        inner = self.lateral[-1](features[-1])
        outs = [self.output[-1](inner)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            # nearest upsampling to the lateral's exact size (C5 at 13x13 -> 25x25 is not 2x)
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.output[i](inner))
        outs.append(self.p6(outs[-1]))
        return tuple(outs)


class BackboneWithFPN(nn.Module):
    """A ResNet followed by an FPN: image (N, 3, H, W) -> (P2, P3, P4, P5, P6)."""

    def __init__(self, body: ResNet, fpn: FPN):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = fpn.out_channels

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.fpn(self.body(x))


def resnet_fpn_backbone(*, blocks=(3, 4, 6, 3), width: int = 64, fpn_channels: int = 256,
                        norm_layer=FrozenBatchNorm2d) -> BackboneWithFPN:
    """ResNet-FPN of any width and depth; the defaults are ResNet50-FPN with frozen BatchNorm."""
    body = ResNet(blocks, width=width, norm_layer=norm_layer)
    return BackboneWithFPN(body, FPN(body.out_channels, fpn_channels))


def imagenet_resnet50_state_dict(path: str | os.PathLike | None = None) -> dict | None:
    """torchvision's ImageNet ResNet50 weights (IMAGENET1K_V1), from a local file when `path`
    is given, else downloaded through torchvision's cache; None, with one line saying why,
    when neither can be had (offline machines)."""
    try:
        if path:
            return torch.load(path, map_location="cpu", weights_only=True)
        from torchvision.models import ResNet50_Weights  # the weight source only
        return ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as err:  # offline, missing file, corrupt file: all mean "go on without"
        print(f"ImageNet ResNet50 weights not available ({type(err).__name__}: {str(err)[:80]}); "
              "using random weights.")
        return None


def sample_photo() -> Tensor:
    """A real photo (Grace Hopper, 512x600, shipped with matplotlib) as FloatTensor[3, H, W]."""
    import matplotlib.cbook
    from PIL import Image
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        rgb = Image.open(f).convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255
