"""The fast paths give the answers of the plain ones: NMS that stops once it has max_keep
boxes, the float32 form of torchvision's IoU threshold test, BatchNorm folded into
convolutions, the fused (folded, channels_last) detector that eval mode runs by default,
RoIAlign for all RoIs at once (roi_align_fast) against the readable roi_align, and training
in channels_last."""
import pytest
import torch
import torchvision
from torch import nn

import frcnn_common as fc
from tests.helpers import trained_scale_


def random_boxes(n, size=100.0, generator=None, max_wh=40.0):
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * max_wh
    return torch.cat([xy, xy + wh], dim=1)


# ---------------------------------------------------------------------------- NMS

def test_iou_exactly_at_a_threshold_that_rounds_up():
    # IoU 30/100 is float32(0.3) = 0.30000001..., above 0.3: torchvision compares in float64
    # and suppresses; comparing with float32(0.3) would not.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 3.0]])
    scores = torch.tensor([0.9, 0.8])
    assert torchvision.ops.nms(boxes, scores, 0.3).tolist() == [0]
    assert fc.nms(boxes, scores, 0.3).tolist() == [0]
    # and an IoU of exactly 0.5 is not above 0.5: both boxes stay
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])  # 50 / 100
    assert fc.nms(boxes, scores, 0.5).tolist() == torchvision.ops.nms(boxes, scores, 0.5).tolist() == [0, 1]


@pytest.mark.parametrize("seed", range(12))
def test_nms_max_keep_equals_torchvision_prefix(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(200, 2500, (1,), generator=g))  # several blocks of 128
    boxes = random_boxes(n, size=300.0, generator=g, max_wh=60.0)
    scores = torch.rand(n, generator=g)
    if seed % 3 == 0:
        scores = torch.randint(0, 5, (n,), generator=g).float()  # ties, across blocks
    threshold = [0.3, 0.5, 0.7][seed % 3]
    expected = torchvision.ops.nms(boxes, scores, threshold)
    assert torch.equal(fc.nms(boxes, scores, threshold), expected)
    for max_keep in (1, 50, 300, 5000):
        assert torch.equal(fc.nms(boxes, scores, threshold, max_keep=max_keep), expected[:max_keep])


@pytest.mark.parametrize("n", [600, 1000, 1001, 4700])  # both of torchvision's routes (switch above 1000)
def test_batched_nms_max_keep_equals_torchvision_prefix(n):
    g = torch.Generator().manual_seed(n)
    boxes = random_boxes(n, size=400.0, generator=g, max_wh=120.0)
    scores = torch.rand(n, generator=g)
    levels = torch.randint(0, 5, (n,), generator=g)
    expected = torchvision.ops.batched_nms(boxes, scores, levels, 0.7)
    assert torch.equal(fc.batched_nms(boxes, scores, levels, 0.7), expected)
    assert torch.equal(fc.batched_nms(boxes, scores, levels, 0.7, max_keep=1000), expected[:1000])
    assert torch.equal(fc.batched_nms(boxes, scores, levels, 0.7, max_keep=7), expected[:7])


# ---------------------------------------------------------------------------- BatchNorm folding

def randomised_batchnorm(bn, generator):
    n = bn.running_mean.shape[0]
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(n, generator=generator))
        bn.bias.copy_(0.1 * torch.randn(n, generator=generator))
        bn.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
        bn.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return bn


@pytest.mark.parametrize("norm_layer", [fc.FrozenBatchNorm2d, nn.BatchNorm2d])
@pytest.mark.parametrize("bias", [False, True])
def test_fold_batchnorm_equals_conv_then_batchnorm(norm_layer, bias):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=bias)
    bn = randomised_batchnorm(norm_layer(16), g).eval()
    x = torch.randn(2, 8, 13, 11, generator=g)
    folded = fc.fold_batchnorm(conv, bn)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    assert folded.bias is not None and not folded.weight.requires_grad


def test_fold_batchnorm_refuses_training_mode_batchnorm():
    with pytest.raises(ValueError, match="training mode"):
        fc.fold_batchnorm(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4).train())


def test_resnet_fold_batchnorm_keeps_its_outputs():
    g = torch.Generator().manual_seed(1)
    net = fc.ResNet((1, 1, 1, 1), width=8, norm_layer=nn.BatchNorm2d)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomised_batchnorm(m, g)
    net.eval()
    x = torch.randn(1, 3, 64, 96, generator=g)
    with torch.no_grad():
        expected = net(x)
        net.fold_batchnorm()
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        for a, b in zip(net(x), expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
        net.fold_batchnorm()  # nothing left to fold: a no-op
        torch.testing.assert_close(net(x)[-1], expected[-1], rtol=1e-4, atol=1e-4 * expected[-1].abs().max().item())


# ---------------------------------------------------------------------------- the fused detector

@pytest.fixture(scope="module")
def detector():
    """ResNet50-FPN with BatchNorm statistics that make folding matter, box regression at a
    trained model's size and one confident class (as in test_detector.py). fused_inference off:
    in eval mode it runs its own modules, the plain path the fused copy is compared with."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = fc.FasterRCNN(91, min_size=320, max_size=512, fused_inference=False)
    for m in model.modules():
        if isinstance(m, fc.FrozenBatchNorm2d):
            n = m.weight.shape[0]
            m.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=g))
            m.bias.copy_(0.05 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.05 * torch.randn(n, generator=g))
            m.running_var.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
    return trained_scale_(model).eval()


def test_fused_detector_gives_the_same_detections(detector):
    fused = detector.fuse()
    photo = fc.sample_photo()
    images = [photo, photo[:, 100:400, 50:333].contiguous()]
    with torch.inference_mode():
        expected, got = detector(images), fused(images)
    for det, ref in zip(got, expected, strict=True):
        assert len(ref["boxes"]) > 0 and len(det["boxes"]) == len(ref["boxes"])
        assert torch.equal(det["labels"], ref["labels"])
        torch.testing.assert_close(det["scores"], ref["scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(det["boxes"], ref["boxes"], atol=1e-2, rtol=0)  # px


def test_fuse_leaves_the_model_alone_and_returns_an_inference_copy(detector):
    fused = detector.fuse()
    assert isinstance(detector.backbone.body.layer1[0].bn1, fc.FrozenBatchNorm2d)   # untouched
    assert not any(isinstance(m, (fc.FrozenBatchNorm2d, nn.BatchNorm2d)) for m in fused.modules())
    assert not fused.training and not any(p.requires_grad for p in fused.parameters())
    conv = fused.backbone.body.layer2[0].conv2
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        features = fused.backbone(torch.rand(1, 3, 128, 160))
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features)


def small_detector(norm_layer=nn.BatchNorm2d, **kwargs):
    return fc.FasterRCNN(5, backbone=fc.resnet_fpn_backbone(blocks=(1, 1, 1, 1), width=8, fpn_channels=32,
                                                            norm_layer=norm_layer),
                         min_size=160, max_size=256, representation_size=64, **kwargs)


def test_eval_mode_runs_the_fused_copy_by_default(detector):
    """The default eval path runs a folded, channels_last backbone: the plain path's detections
    within 1e-2 px; the backbone built once and reused, rebuilt when a weight changes; the
    model's settings apply."""
    model = fc.FasterRCNN(91, min_size=320, max_size=512).eval()
    model.load_state_dict(detector.state_dict())
    images = [fc.sample_photo()]
    with torch.inference_mode():
        got, expected = model(images), detector(images)
        backbone = fc.inference_backbone(model)
        assert fc.inference_backbone(model) is backbone             # cached
        assert not any(isinstance(m, fc.FrozenBatchNorm2d) for m in backbone.modules())
        assert backbone.body.layer2[0].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    for det, ref in zip(got, expected, strict=True):
        assert len(ref["boxes"]) > 0 and len(det["boxes"]) == len(ref["boxes"])
        assert torch.equal(det["labels"], ref["labels"])
        torch.testing.assert_close(det["scores"], ref["scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(det["boxes"], ref["boxes"], atol=1e-2, rtol=0)  # px
    assert isinstance(model.backbone.body.layer1[0].bn1, fc.FrozenBatchNorm2d)  # the model's own modules stay
    model.roi_heads.score_thresh = 0.99                             # settings are the model's own
    with torch.inference_mode():
        assert all((det["scores"] > 0.99).all() for det in model(images))
    with torch.no_grad():
        model.backbone.fpn.output[0].bias += 1.0                     # a weight changes in place
    with torch.inference_mode():
        assert fc.inference_backbone(model) is not backbone          # rebuilt
        torch.testing.assert_close(fc.inference_backbone(model).fpn.output[0].bias, model.backbone.fpn.output[0].bias)
    assert "_inference_backbone" in model.__dict__ and "_inference_backbone" not in copy_of_state(model)


def copy_of_state(model):
    from copy import deepcopy
    return deepcopy(model).__dict__  # copies leave the cached inference backbone behind


def test_train_after_eval_trains_the_real_modules():
    """eval -> inference -> train(): real BatchNorm in training mode, a step changes the
    parameters; then eval gives what a fresh model with those weights gives."""
    torch.manual_seed(0)
    model = small_detector().eval()
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 150, 200, generator=g), torch.rand(3, 170, 140, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 120.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 60.0, 40.0]]), "labels": torch.tensor([2])}]
    with torch.inference_mode():
        model(images)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns) and "_inference_backbone" not in model.__dict__
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = model(images, targets)
    sum(losses.values()).backward()
    optimizer.step()
    after = model.state_dict()
    assert not torch.equal(before["backbone.body.layer3.0.conv2.weight"], after["backbone.body.layer3.0.conv2.weight"])
    assert not torch.equal(before["backbone.body.bn1.running_mean"], after["backbone.body.bn1.running_mean"])
    fresh = small_detector().eval()
    fresh.load_state_dict(model.state_dict())
    model.eval()
    with torch.inference_mode():
        got, expected = model(images), fresh(images)
    for det, ref in zip(got, expected, strict=True):
        assert torch.equal(det["labels"], ref["labels"]) and torch.equal(det["boxes"], ref["boxes"])
        assert torch.equal(det["scores"], ref["scores"])


# ---------------------------------------------------------------------------- RoIAlign for all RoIs at once

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_fast_equals_the_readable_roi_align(seed, aligned, sampling_ratio):
    """Values and gradients, empty and degenerate RoIs included, and one piece after another
    (2000 RoIs at 7x7 with 2x2 samples are several pieces)."""
    g = torch.Generator().manual_seed(seed)
    h, w = int(torch.randint(5, 40, (1,), generator=g)), int(torch.randint(5, 40, (1,), generator=g))
    x = torch.randn(2, 3, h, w, generator=g)
    if seed % 2:
        x = x.contiguous(memory_format=torch.channels_last)
    num = 2000 if seed == 0 else 60
    xy = torch.rand(num, 2, generator=g) * torch.tensor([w, h]) * 2.4 - 8
    wh = torch.rand(num, 2, generator=g) * torch.tensor([w, h]) * 1.6
    rois = torch.cat([torch.randint(0, 2, (num, 1), generator=g).float(), xy, xy + wh], dim=1)
    rois[:4, 3:] = rois[:4, 1:3]            # zero size
    rois[4:6, 1:3] = rois[4:6, 3:] + 2.0    # negative size
    out_size = [(7, 7), (3, 5), 2][seed % 3]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    readable = fc.roi_align(x1, rois, out_size, 0.5, sampling_ratio, aligned)
    fast = fc.roi_align_fast(x2, rois, out_size, 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(fast, readable, atol=1e-5, rtol=1e-5)
    weights = torch.randn(readable.shape, generator=g)
    (readable * weights).sum().backward()
    (fast * weights).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_multiscale_roi_align_in_pieces_equals_torchvision(channels_last):
    """700 RoIs are more than one piece (334 at 7x7 with 2x2 samples); values and gradients."""
    from collections import OrderedDict
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 8, 160 // s, 200 // s, generator=g) for s in (4, 8, 16, 32)]
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    sizes = [(640, 800), (600, 780)]
    boxes = [random_boxes(400, size=600, generator=g, max_wh=400), random_boxes(300, size=560, generator=g, max_wh=300)]
    ours_feats = [f.clone().requires_grad_() for f in feats]
    ref_feats = [f.clone().requires_grad_() for f in feats]
    weights = torch.randn(700, 8, 7, 7, generator=g)
    ours = fc.MultiScaleRoIAlign()(ours_feats, boxes, sizes)
    ref = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(
        OrderedDict((str(i), f) for i, f in enumerate(ref_feats)), boxes, sizes)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    for a, b in zip(ours_feats, ref_feats, strict=True):
        grad = torch.zeros_like(a) if a.grad is None else a.grad  # a level no RoI uses gets no gradient
        torch.testing.assert_close(grad, b.grad, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- training in channels_last

def test_channels_last_training_gives_the_same_losses():
    """Frozen BatchNorm, as a detector trains from pretrained weights. (With batch statistics
    the reordered sums can move a proposal across a sampling threshold in a model this small.)"""
    torch.manual_seed(0)
    model = fc.FasterRCNN(5, backbone=fc.resnet_fpn_backbone(blocks=(1, 1, 1, 1), width=8, fpn_channels=32,
                                                             norm_layer=fc.FrozenBatchNorm2d),
                          min_size=160, max_size=256, representation_size=64).train()
    fast = fc.FasterRCNN(5, backbone=fc.resnet_fpn_backbone(blocks=(1, 1, 1, 1), width=8, fpn_channels=32,
                                                            norm_layer=fc.FrozenBatchNorm2d),
                         min_size=160, max_size=256, representation_size=64).train()
    fast.load_state_dict(model.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 150, 200, generator=g), torch.rand(3, 170, 140, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 120.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 60.0, 40.0], [30.0, 50.0, 130.0, 160.0]]),
                "labels": torch.tensor([2, 4])}]
    torch.manual_seed(7)
    expected = model(images, targets)
    torch.manual_seed(7)
    got = fast(images, targets)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)
    sum(got.values()).backward()
    sum(expected.values()).backward()
    a, b = fast.backbone.body.layer3[0].conv2.weight.grad, model.backbone.body.layer3[0].conv2.weight.grad
    torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=0)


@pytest.mark.parametrize("distinct", [3, 50, 100_000])
def test_batched_nms_puts_equal_scores_in_torchvision_order(distinct):
    """Above 1000 boxes torchvision sorts the kept boxes with an unstable sort; equal scores
    (a few distinct values, or the coincidences of thousands of floats) come out in its order."""
    g = torch.Generator().manual_seed(distinct)
    n = 4000
    boxes = random_boxes(n, size=400.0, generator=g, max_wh=120.0)
    scores = torch.randint(0, distinct, (n,), generator=g).float() / distinct
    levels = torch.randint(0, 5, (n,), generator=g)
    expected = torchvision.ops.batched_nms(boxes, scores, levels, 0.7)
    assert torch.equal(fc.batched_nms(boxes, scores, levels, 0.7), expected)
    for max_keep in (0, 10, 1000):
        assert torch.equal(fc.batched_nms(boxes, scores, levels, 0.7, max_keep=max_keep), expected[:max_keep])
