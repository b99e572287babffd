"""Section 02: Bottleneck, ResNet50, FPN, FrozenBatchNorm2d, checked against the facts the
notebook shows and against torchvision's resnet50, FeaturePyramidNetwork and resnet_fpn_backbone
(random weights: nothing is downloaded)."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import frcnn_common as fc

IMG_SIZE = 400  # the side the shapes of notebook 02 are quoted at


def num_params(module):
    return sum(p.numel() for p in module.parameters())


def randomize_batchnorm_(model, seed=0):
    """torchvision's init leaves BatchNorm as an identity (weight 1, bias 0, mean 0, var 1), which
    would hide a BatchNorm wired wrongly; give every BatchNorm distinct statistics and affine terms."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)):
            n = m.weight.shape[0]
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def torchvision_c5(model, x):
    """torchvision's resnet forward up to layer4 (its avgpool and fc dropped)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


@pytest.fixture(scope="module")
def tv_resnet50():
    torch.manual_seed(0)
    return randomize_batchnorm_(torchvision.models.resnet50()).eval()


@pytest.fixture(scope="module")
def features_400():
    """C2..C5 and P2..P6 of a random ResNet50 + FPN on a 400x400 input."""
    torch.manual_seed(0)
    backbone, fpn = fc.ResNet50().eval(), fc.FPN().eval()
    with torch.no_grad():
        cs = backbone(torch.randn(1, 3, IMG_SIZE, IMG_SIZE))
        ps = fpn(cs)
    return cs, ps


# --- Bottleneck ----------------------------------------------------------------------------

def test_bottleneck_prints_conv_bn_triplets():
    block = fc.Bottleneck(64, 64)
    names = [name for name, _ in block.named_children()]
    assert names == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3"]
    text = str(block)
    for line in [
        "(conv1): Conv2d(64, 64, kernel_size=(1, 1), stride=(1, 1), bias=False)",
        "(conv2): Conv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)",
        "(conv3): Conv2d(64, 256, kernel_size=(1, 1), stride=(1, 1), bias=False)",
    ]:
        assert line in text
    assert [block.bn1.num_features, block.bn2.num_features, block.bn3.num_features] == [64, 64, 256]
    assert all(isinstance(m, nn.BatchNorm2d) for m in (block.bn1, block.bn2, block.bn3))


def test_bottleneck_v15_puts_stride_on_3x3_and_is_identity_when_residual_is_zero():
    downsample = nn.Sequential(nn.Conv2d(256, 512, 1, stride=2, bias=False), nn.BatchNorm2d(512))
    block = fc.Bottleneck(256, 128, stride=2, downsample=downsample).eval()
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block(torch.randn(1, 256, 15, 15)).shape == (1, 512, 8, 8)

    block = fc.Bottleneck(256, 64).eval()
    nn.init.zeros_(block.bn3.weight)  # F(x) = 0, so y = ReLU(x)
    x = torch.randn(2, 256, 7, 7)
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(x))


# --- ResNet50 ------------------------------------------------------------------------------

def test_resnet50_has_torchvision_layout_and_parameter_count():
    ours = fc.ResNet50()
    tv = torchvision.models.resnet50()
    tv_params = {k: v.shape for k, v in tv.named_parameters() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.named_parameters()} == tv_params
    assert num_params(ours) == 23_508_032
    assert num_params(ours) == num_params(tv) - num_params(tv.fc)


def test_resnet50_stage_shapes_at_400(features_400):
    (c2, c3, c4, c5), _ = features_400
    assert c2.shape == (1, 256, 100, 100)
    assert c3.shape == (1, 512, 50, 50)
    assert c4.shape == (1, 1024, 25, 25)
    assert c5.shape == (1, 2048, 13, 13)


def test_load_torchvision_state_dict_matches_torchvision_layer4(tv_resnet50):
    ours = fc.ResNet50().eval()
    ours.load_torchvision_state_dict(tv_resnet50.state_dict())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = torchvision_c5(tv_resnet50, x)
        c5 = ours(x)[-1]
    assert c5.shape == (2, 2048, 2, 3)
    torch.testing.assert_close(c5, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_load_torchvision_state_dict_is_strict(tv_resnet50):
    state_dict = dict(tv_resnet50.state_dict())
    del state_dict["layer3.2.bn2.running_var"]
    with pytest.raises(RuntimeError, match="layer3.2.bn2.running_var"):
        fc.ResNet50().load_torchvision_state_dict(state_dict)


def test_frozen_batchnorm_resnet_matches_torchvision(tv_resnet50):
    ours = fc.ResNet50(norm_layer=fc.FrozenBatchNorm2d).load_torchvision_state_dict(tv_resnet50.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = torchvision_c5(tv_resnet50, x)
        c5 = ours(x)[-1]
    torch.testing.assert_close(c5, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_frozen_batchnorm_equals_batchnorm_in_eval_mode():
    bn = randomize_batchnorm_(nn.BatchNorm2d(32)).eval()
    frozen = fc.FrozenBatchNorm2d(32)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped on the way in
    x = torch.randn(4, 32, 9, 11)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)
    assert list(frozen.parameters()) == []  # all four tensors are buffers

    tv_frozen = torchvision.ops.FrozenBatchNorm2d(32)
    tv_frozen.load_state_dict(frozen.state_dict())
    assert torch.equal(frozen(x), tv_frozen(x))  # same arithmetic order, bit for bit


def test_freeze_3_trains_only_layer2_to_layer4():
    model = fc.ResNet50().freeze(3)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name.split(".")[0] for name, p in model.named_parameters() if not p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert frozen == {"conv1", "bn1", "layer1"}
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert not any(p.requires_grad for p in fc.ResNet50().freeze(0).parameters())
    assert all(p.requires_grad for p in fc.ResNet50().freeze(5).parameters())


# --- FPN -----------------------------------------------------------------------------------

def test_fpn_children():
    fpn = fc.FPN()
    assert [name for name, _ in fpn.named_children()] == ["lateral", "output", "p6"]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in fpn.lateral] == [
        (256, 256, (1, 1)), (512, 256, (1, 1)), (1024, 256, (1, 1)), (2048, 256, (1, 1))]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in fpn.output] == [
        (256, 256, (3, 3), (1, 1))] * 4
    assert isinstance(fpn.p6, nn.MaxPool2d)
    assert (fpn.p6.kernel_size, fpn.p6.stride, fpn.p6.padding) == (1, 2, 0)


def test_fpn_level_shapes_at_400(features_400):
    _, ps = features_400
    assert [tuple(p.shape) for p in ps] == [(1, 256, s, s) for s in (100, 50, 25, 13, 7)]


def test_backbone_plus_fpn_parameter_count():
    assert num_params(fc.ResNet50()) + num_params(fc.FPN()) == 26_852_416


def test_fpn_matches_torchvision_feature_pyramid_network():
    torch.manual_seed(0)
    ours = fc.FPN((16, 32, 64, 128), 24).eval()
    tv = FeaturePyramidNetwork([16, 32, 64, 128], 24, extra_blocks=LastLevelMaxPool()).eval()
    for i in range(4):  # torchvision names: inner_blocks = lateral, layer_blocks = output
        tv.inner_blocks[i][0].load_state_dict(ours.lateral[i].state_dict())
        tv.layer_blocks[i][0].load_state_dict(ours.output[i].state_dict())
    # odd sizes, so that upsampling to the lateral's exact size matters
    sizes = [(37, 50), (19, 25), (10, 13), (5, 7)]
    cs = [torch.randn(2, c, h, w) for c, (h, w) in zip((16, 32, 64, 128), sizes)]
    with torch.no_grad():
        ps = ours(cs)
        expected = list(tv({str(i): c for i, c in enumerate(cs)}).values())
    assert len(ps) == len(expected) == 5
    for p, e in zip(ps, expected, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-5)


def test_resnet_fpn_backbone_matches_torchvision():
    torch.manual_seed(0)
    tv = randomize_batchnorm_(tv_resnet_fpn_backbone(backbone_name="resnet50", weights=None)).eval()
    ours = fc.resnet_fpn_backbone().eval()
    tv_sd = tv.state_dict()
    ours.body.load_torchvision_state_dict({k[len("body."):]: v for k, v in tv_sd.items() if k.startswith("body.")})
    fpn_sd = {}
    for i in range(4):
        for kind in ("weight", "bias"):
            fpn_sd[f"lateral.{i}.{kind}"] = tv_sd[f"fpn.inner_blocks.{i}.0.{kind}"]
            fpn_sd[f"output.{i}.{kind}"] = tv_sd[f"fpn.layer_blocks.{i}.0.{kind}"]
    ours.fpn.load_state_dict(fpn_sd, strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ps = ours(x)
        expected = list(tv(x).values())
    for p, e in zip(ps, expected, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


def test_narrow_resnet_fpn_keeps_the_strides():
    torch.manual_seed(0)
    body = fc.ResNet((1, 1, 1, 1), width=16, norm_layer=nn.BatchNorm2d).eval()
    assert body.out_channels == [64, 128, 256, 512]
    fpn = fc.FPN(body.out_channels, 256).eval()
    with torch.no_grad():
        cs = body(torch.randn(1, 3, IMG_SIZE, IMG_SIZE))
        ps = fpn(cs)
    assert [tuple(c.shape) for c in cs] == [(1, 64, 100, 100), (1, 128, 50, 50), (1, 256, 25, 25), (1, 512, 13, 13)]
    assert [tuple(p.shape) for p in ps] == [(1, 256, s, s) for s in (100, 50, 25, 13, 7)]
