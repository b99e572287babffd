"""The whole detector against torchvision's fasterrcnn_resnet50_fpn, given the same weights:
the same proposals, the same detections and the same four training losses.

The torchvision model is randomly initialised (nothing can be downloaded here) and its
state dict converted to ours. A random model predicts huge box deltas whose exp() amplifies
float rounding, so its box-regression weights are scaled to a trained model's size
(x0.02 box head, x0.1 RPN), and one class's bias is raised so that it is confident enough
to produce detections, which puts post-processing under test too.

Smoke form (default): images resized to 320 px. --full / FRCNN_FULL_TESTS=1: torchvision's
default 800/1333.
"""
import pytest
import torch
from torch import nn

import frcnn_common as fc
from tests.helpers import random_torchvision_detector
from tests.test_backbone import randomize_batchnorm_

BOX_ATOL = 1e-3    # px, the arithmetic runs in torchvision's order
SCORE_ATOL = 1e-4
# In eval mode ours folds BatchNorm into the convolutions (another order of arithmetic, which 50
# layers of random statistics amplify): detections agree within this; a folding error moves
# them by pixels.
DETECTION_BOX_ATOL = 0.05


@pytest.fixture(scope="module")
def models(full_tests):
    sizes = dict(min_size=800, max_size=1333) if full_tests else dict(min_size=320, max_size=512)
    ref = random_torchvision_detector(**sizes)
    # Distinct BatchNorm statistics (torchvision's init is an identity): in eval mode ours folds
    # them into the convolutions, and a folding error must show.
    randomize_batchnorm_(ref)
    # torchvision builds an untrained backbone with BatchNorm2d: ours uses the same layer here
    ours = fc.FasterRCNN(91, backbone=fc.resnet_fpn_backbone(norm_layer=nn.BatchNorm2d), **sizes).eval()
    ours.load_torchvision_state_dict(ref.state_dict())
    return ref, ours


def test_state_dict_converts_strictly(models):
    """Every torchvision tensor lands, unchanged, under the name written out here by hand."""
    ref, ours = models
    theirs, mine = ref.state_dict(), ours.state_dict()
    by_hand = {"backbone.fpn.inner_blocks.2.0.weight": "backbone.fpn.lateral.2.weight",
               "backbone.fpn.layer_blocks.3.0.bias": "backbone.fpn.output.3.bias",
               "rpn.head.conv.0.0.weight": "rpn.head.conv.weight",
               "backbone.body.layer3.5.bn2.running_var": "backbone.body.layer3.5.bn2.running_var",
               "roi_heads.box_head.fc7.weight": "roi_heads.box_head.fc7.weight",
               "roi_heads.box_predictor.bbox_pred.bias": "roi_heads.box_predictor.bbox_pred.bias"}
    for key, name in by_hand.items():
        assert torch.equal(mine[name], theirs[key]), (key, name)
    converted = ours.from_torchvision_keys(theirs)
    assert converted.keys() == mine.keys() and len(converted) == len(theirs)   # one to one
    for key, value in converted.items():
        assert torch.equal(mine[key], value), key
    # and loading is strict: a key torchvision has and we drop would be an error
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fc.FasterRCNN(91, backbone=fc.resnet_fpn_backbone(norm_layer=nn.BatchNorm2d)).load_torchvision_state_dict(
            {**theirs, "roi_heads.box_head.fc8.weight": torch.zeros(1)})


def test_frozen_batchnorm_model_loads_torchvision_weights(models):
    ref, _ = models
    frozen = fc.FasterRCNN(91).load_torchvision_state_dict(ref.state_dict())
    assert isinstance(frozen.backbone.body.bn1, fc.FrozenBatchNorm2d)
    assert not frozen.backbone.body.conv1.weight.requires_grad           # stem frozen, as torchvision
    assert frozen.backbone.body.layer2[0].conv1.weight.requires_grad


def image_sets():
    g = torch.Generator().manual_seed(1)
    photo = fc.sample_photo()
    yield "photo", [photo]
    yield "random sizes", [torch.rand(3, 300, 457, generator=g), torch.rand(3, 512, 271, generator=g)]
    yield "photo and crop", [photo, photo[:, 100:400, 50:333].contiguous()]


@pytest.mark.parametrize("name, images", list(image_sets()), ids=lambda v: v if isinstance(v, str) else "")
@torch.no_grad()
def test_same_proposals(models, name, images):
    ref, ours = models
    image_list, _ = ref.transform(images)
    ref_features = ref.backbone(image_list.tensors)
    ref_proposals, _ = ref.rpn(image_list, ref_features)

    batch, image_sizes, _ = ours.transform(images)
    assert torch.equal(batch, image_list.tensors) and image_sizes == [tuple(s) for s in image_list.image_sizes]
    features = ours.backbone(batch)
    for a, b in zip(features, ref_features.values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    proposals, scores, _ = ours.rpn(batch.shape[-2:], image_sizes, features)
    for p, rp in zip(proposals, ref_proposals, strict=True):
        assert p.shape == rp.shape and len(p) > 100
        # the same set of boxes: torchvision orders proposals of exactly equal scores with an
        # unstable sort, so each of ours must have its twin within BOX_ATOL, and vice versa
        dist = torch.cdist(p, rp, p=float("inf"))
        assert dist.min(dim=1).values.max() <= BOX_ATOL and dist.min(dim=0).values.max() <= BOX_ATOL
        assert (p - rp).abs().max(dim=1).values.gt(BOX_ATOL).float().mean() < 0.01  # and nearly all in order


@pytest.mark.parametrize("name, images", list(image_sets()), ids=lambda v: v if isinstance(v, str) else "")
@torch.no_grad()
def test_same_detections(models, name, images):
    ref, ours = models
    expected, got = ref(images), ours(images)
    for det, ref_det in zip(got, expected, strict=True):
        assert len(ref_det["boxes"]) > 0, "the reference must detect something for the test to bite"
        assert_same_detections(det, ref_det)


def assert_same_detections(det, ref_det):
    """The same detections: each of ours has a twin in the reference (same label, box within
    DETECTION_BOX_ATOL, score within SCORE_ATOL), one to one. Order is compared up to exactly tied
    scores, which torchvision sorts with an unstable sort."""
    assert len(det["boxes"]) == len(ref_det["boxes"])
    dist = torch.cdist(det["boxes"], ref_det["boxes"], p=float("inf"))
    dist[det["labels"][:, None] != ref_det["labels"][None, :]] = float("inf")
    dist[(det["scores"][:, None] - ref_det["scores"][None, :]).abs() > SCORE_ATOL] = float("inf")
    twin = dist.argmin(dim=1)
    assert dist.min(dim=1).values.max() <= DETECTION_BOX_ATOL
    assert len(set(twin.tolist())) == len(twin)  # one to one
    torch.testing.assert_close(det["scores"], ref_det["scores"], atol=SCORE_ATOL, rtol=0)  # same order of scores


def make_targets():
    photo = fc.sample_photo()
    g = torch.Generator().manual_seed(2)
    other = torch.rand(3, 360, 420, generator=g)
    targets = [
        {"boxes": torch.tensor([[120.0, 60.0, 400.0, 520.0], [20.0, 300.0, 150.0, 590.0]]),
         "labels": torch.tensor([1, 7])},
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0], [200.0, 100.0, 410.0, 350.0], [50, 60, 120, 300.0]]),
         "labels": torch.tensor([3, 3, 90])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an empty image
    ]
    return [photo, other, torch.rand(3, 200, 300, generator=g)], targets


def test_same_training_losses_and_gradients(models):
    """Same seed -> the same sampled anchors and RoIs in both (the samplers draw in the same
    order) -> the same four losses and the same gradients."""
    ref, ours = models
    images, targets = make_targets()
    names = {"rpn_objectness": "loss_objectness", "rpn_box": "loss_rpn_box_reg",
             "roi_classifier": "loss_classifier", "roi_box": "loss_box_reg"}
    ref.train(), ours.train()
    try:
        torch.manual_seed(7)
        ref_losses = ref(images, [dict(t) for t in targets])
        torch.manual_seed(7)
        losses = ours(images, targets)
        assert set(losses) == set(names)
        for ours_name, ref_name in names.items():
            torch.testing.assert_close(losses[ours_name], ref_losses[ref_name], atol=1e-5, rtol=1e-4)
            assert torch.isfinite(losses[ours_name]) and losses[ours_name] > 0
        sum(ref_losses.values()).backward()
        sum(losses.values()).backward()
        ref_params = dict(ref.named_parameters())
        # summation order differs (RoIAlign's backward, BatchNorm over the batch), and a
        # training-mode BatchNorm's backward through 50 layers amplifies it: compare each gradient
        # on its own scale, the deep backbone one more loosely
        for key, scale in [("roi_heads.box_predictor.cls_score.weight", 3e-3), ("roi_heads.box_head.fc6.weight", 3e-3),
                           ("rpn.head.cls_logits.weight", 3e-3), ("backbone.body.layer4.2.conv3.weight", 1e-2)]:
            ours_grad = dict(ours.named_parameters())[key].grad
            ref_grad = ref_params[key].grad
            torch.testing.assert_close(ours_grad, ref_grad, atol=scale * ref_grad.abs().max().item(), rtol=0)
    finally:
        ref.eval(), ours.eval()
        ref.zero_grad(), ours.zero_grad()


def test_training_input_errors_are_clear(models):
    _, ours = models
    ours.train()
    try:
        image = torch.rand(3, 64, 64)
        with pytest.raises(ValueError, match="one target dict per image"):
            ours([image])
        with pytest.raises(ValueError, match="zero or negative size"):
            ours([image], [{"boxes": torch.tensor([[10.0, 10.0, 10.0, 20.0]]), "labels": torch.tensor([1])}])
        with pytest.raises(ValueError, match="int64"):
            ours([image], [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([1.0])}])
    finally:
        ours.eval()
    with pytest.raises(ValueError, match=r"float tensor \(3, H, W\)"):
        ours([torch.zeros(64, 64, dtype=torch.uint8)])
