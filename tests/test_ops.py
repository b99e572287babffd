"""Every op of sections 03 and 04 against torchvision.ops (the reference) or a hand-computed example."""
import math

import pytest
import torch
import torchvision

import frcnn_common as fc


def random_boxes(n, size=100.0, generator=None, max_wh=40.0):
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * max_wh
    return torch.cat([xy, xy + wh], dim=1)


# ---------------------------------------------------------------------------- box_iou, clipping

def test_box_iou_hand_example():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    # overlap 5x5 = 25, union 100 + 100 - 25 = 175
    expected = torch.tensor([[25 / 175, 0.0, 1.0]])
    torch.testing.assert_close(fc.box_iou(a, b), expected)


@pytest.mark.parametrize("seed", range(10))
def test_box_iou_equals_torchvision(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = random_boxes(37, generator=g), random_boxes(53, generator=g)
    a[:3, 2:] = a[:3, :2]  # degenerate (zero-area) boxes give NaN or 0 in both
    assert torch.equal(fc.box_iou(a, b).nan_to_num(-1), torchvision.ops.box_iou(a, b).nan_to_num(-1))


def test_box_iou_empty():
    assert fc.box_iou(torch.zeros(0, 4), random_boxes(5)).shape == (0, 5)


def test_clip_and_remove_small_equal_torchvision():
    boxes = random_boxes(200, size=120) - 10
    clipped = fc.clip_boxes_to_image(boxes, (90, 100))
    assert torch.equal(clipped, torchvision.ops.clip_boxes_to_image(boxes, (90, 100)))
    assert torch.equal(fc.remove_small_boxes(clipped, 5.0), torchvision.ops.remove_small_boxes(clipped, 5.0))


# ---------------------------------------------------------------------------- nms, batched_nms

@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_equals_torchvision(seed, threshold):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 400, (1,), generator=g))
    boxes = random_boxes(n, generator=g)
    scores = torch.rand(n, generator=g)
    if seed % 3 == 0:  # ties: few distinct scores
        scores = torch.randint(0, 4, (n,), generator=g).float()
    if seed % 5 == 0:  # duplicated boxes and degenerate boxes
        boxes[n // 2:] = boxes[: n - n // 2].clone()
        boxes[:2, 2:] = boxes[:2, :2]
    assert torch.equal(fc.nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold))


def test_nms_hand_example():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [2, 2, 12, 12.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # box 3 (0.95) suppresses 0 (IoU 64/136) only at 0.4; at 0.5 it suppresses box 1 (IoU 81/119)
    assert fc.nms(boxes, scores, 0.5).tolist() == [3, 0, 2]
    assert fc.nms(boxes, scores, 0.4).tolist() == [3, 2]


def test_nms_empty():
    assert fc.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    assert fc.batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0


@pytest.mark.parametrize("seed", range(15))
def test_batched_nms_equals_torchvision(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 1500, (1,), generator=g))  # above 1000 boxes torchvision changes method
    boxes = random_boxes(n, generator=g)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, 7, (n,), generator=g)
    assert torch.equal(fc.batched_nms(boxes, scores, idxs, 0.5), torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))


# ---------------------------------------------------------------------------- roi_align

def random_rois(num, n_images, height, width, scale, generator):
    x1 = torch.rand(num, generator=generator) * width / scale * 1.2 - 8
    y1 = torch.rand(num, generator=generator) * height / scale * 1.2 - 8
    w = torch.rand(num, generator=generator) * width / scale * 0.8
    h = torch.rand(num, generator=generator) * height / scale * 0.8
    idx = torch.randint(0, n_images, (num,), generator=generator).float()
    rois = torch.stack([idx, x1, y1, x1 + w, y1 + h], dim=1)
    rois[:4, 3:] = rois[:4, 1:3]            # degenerate: zero size
    rois[4:6, 1:3] = rois[4:6, 3:] + 2.0    # negative size
    return rois


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
def test_roi_align_equals_torchvision(seed, aligned, sampling_ratio):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = 2, 3, int(torch.randint(5, 30, (1,), generator=g)), int(torch.randint(5, 30, (1,), generator=g))
    x = torch.randn(n, c, h, w, generator=g)
    scale = [1.0, 0.5, 0.25][seed % 3]
    rois = random_rois(40, n, h, w, scale, g)
    out_size = [(7, 7), (3, 5), 2][seed % 3]
    ours = fc.roi_align(x, rois, out_size, scale, sampling_ratio, aligned)
    ref = torchvision.ops.roi_align(x, rois, out_size, scale, sampling_ratio, aligned)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_roi_align_list_of_boxes_and_empty():
    x = torch.randn(2, 4, 16, 16)
    boxes = [torch.tensor([[1.0, 1.0, 9.0, 7.0]]), torch.tensor([[0.0, 2.0, 15.0, 15.0], [3.0, 3.0, 4.0, 4.0]])]
    torch.testing.assert_close(fc.roi_align(x, boxes, 7, 1.0, 2), torchvision.ops.roi_align(x, boxes, 7, 1.0, 2))
    assert fc.roi_align(x, torch.zeros(0, 5), 7).shape == (0, 4, 7, 7)


def test_roi_align_hand_example():
    # A 1x1 bin with one sample at its centre reads the bilinear value there:
    # box (0.5, 0.5)-(1.5, 1.5) on a 2x2 ramp, sample at (1.0, 1.0) -> pixel (1, 1) = 3.
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    out = fc.roi_align(x, torch.tensor([[0, 0.5, 0.5, 1.5, 1.5]]), 1, 1.0, 1, aligned=False)
    assert out.item() == pytest.approx(3.0)
    # the sample at (0.5, 0.5) averages all four pixels: 1.5
    out = fc.roi_align(x, torch.tensor([[0, 0.0, 0.0, 1.0, 1.0]]), 1, 1.0, 1, aligned=False)
    assert out.item() == pytest.approx(1.5)


def test_roi_align_gradient_equals_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 12, 14, generator=g)
    rois = random_rois(20, 2, 12, 14, 0.5, g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn(20, 3, 7, 7, generator=g)
    (fc.roi_align(x1, rois, 7, 0.5, 2) * weights).sum().backward()
    (torchvision.ops.roi_align(x2, rois, 7, 0.5, 2) * weights).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_roi_align_channels_last_input():
    x = torch.randn(1, 8, 20, 20).to(memory_format=torch.channels_last)
    rois = torch.tensor([[0, 2.0, 3.0, 15.0, 11.0]])
    torch.testing.assert_close(fc.roi_align(x, rois, 7, 1.0, 2), torchvision.ops.roi_align(x, rois, 7, 1.0, 2))


# ---------------------------------------------------------------------------- anchors, box coder

def test_cell_anchors_hand_computed():
    # size 32, ratios 0.5/1/2: w = 32/sqrt(r), h = 32*sqrt(r), centred on 0, rounded
    expected = torch.tensor([[-23.0, -11.0, 23.0, 11.0],
                             [-16.0, -16.0, 16.0, 16.0],
                             [-11.0, -23.0, 11.0, 23.0]])
    assert torch.equal(fc.AnchorGenerator.cell_anchor(32, (0.5, 1.0, 2.0)), expected)


def test_grid_anchors_hand_computed():
    # a 2x2 grid of stride 4 with one 8x8 anchor: the anchor shifted to (0,0), (4,0), (0,4), (4,4)
    cell = torch.tensor([[-4.0, -4.0, 4.0, 4.0]])
    anchors = fc.AnchorGenerator().grid_anchors((2, 2), (4, 4), cell)
    expected = torch.tensor([[-4.0, -4.0, 4.0, 4.0], [0.0, -4.0, 8.0, 4.0],
                             [-4.0, 0.0, 4.0, 8.0], [0.0, 0.0, 8.0, 8.0]])
    assert torch.equal(anchors, expected)


def test_anchors_equal_torchvision():
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    sizes = ((32,), (64,), (128,), (256,), (512,))
    ref = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    batch = torch.zeros(1, 3, 416, 608)  # 416 is not a multiple of 64: P6's stride rounds down
    feats = [torch.zeros(1, 8, math.ceil(416 / s), math.ceil(608 / s)) for s in (4, 8, 16, 32, 64)]
    expected = ref(ImageList(batch, [(400, 600)]), feats)[0]
    assert torch.equal(fc.AnchorGenerator()(batch.shape[-2:], feats), expected)


def test_box_coder_round_trip_and_torchvision():
    from torchvision.models.detection._utils import BoxCoder
    g = torch.Generator().manual_seed(0)
    ref_boxes, gt_boxes = random_boxes(50, generator=g) + 1, random_boxes(50, generator=g) + 1
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        ours, tv = fc.BoxCoder(weights), BoxCoder(weights)
        deltas = ours.encode(gt_boxes, ref_boxes)
        assert torch.equal(deltas, tv.encode_single(gt_boxes, ref_boxes))
        torch.testing.assert_close(ours.decode(deltas, ref_boxes)[:, 0], gt_boxes, atol=1e-4, rtol=0)
        big = torch.randn(50, 12, generator=g) * 5  # 3 boxes per row, deltas beyond the clamp
        assert torch.equal(ours.decode(big, ref_boxes), tv.decode_single(big, ref_boxes).reshape(50, 3, 4))


def test_box_coder_hand_example():
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0]])   # centre (5, 10), 10 x 20
    gt = torch.tensor([[5.0, 0.0, 15.0, 40.0]])    # centre (10, 20), 10 x 40
    deltas = fc.BoxCoder().encode(gt, ref)
    torch.testing.assert_close(deltas, torch.tensor([[0.5, 0.5, 0.0, math.log(2.0)]]))


# ---------------------------------------------------------------------------- matcher, sampler

def test_matcher_hand_example():
    iou = torch.tensor([[0.9, 0.5, 0.1, 0.2],
                        [0.1, 0.6, 0.2, 0.25]])
    # pred 0 -> GT 0 (0.9 >= 0.7); pred 1: 0.6 in [0.3, 0.7) -> BETWEEN, but it is GT 1's best
    # match, so low-quality matching gives it GT 1; pred 2: 0.2 < 0.3 -> BELOW; pred 3: 0.25 -> BELOW
    matcher = fc.Matcher(0.7, 0.3, allow_low_quality_matches=False)
    assert matcher(iou.clone()).tolist() == [0, -2, -1, -1]
    matcher = fc.Matcher(0.7, 0.3, allow_low_quality_matches=True)
    assert matcher(iou.clone()).tolist() == [0, 1, -1, -1]


def test_matcher_equals_torchvision():
    from torchvision.models.detection._utils import Matcher
    g = torch.Generator().manual_seed(1)
    iou = fc.box_iou(random_boxes(10, generator=g), random_boxes(500, generator=g))
    for low_quality in (False, True):
        ours = fc.Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)(iou.clone())
        assert torch.equal(ours, Matcher(0.7, 0.3, low_quality)(iou.clone()))


def test_sampler_counts_and_torchvision_draws():
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
    labels = [torch.tensor([1] * 10 + [0] * 300 + [-1] * 50), torch.tensor([2] * 200 + [0] * 20)]
    torch.manual_seed(3)
    pos, neg = fc.BalancedSampler(256, 0.5)(labels)
    assert [len(p) for p in pos] == [10, 128] and [len(n) for n in neg] == [246, 20]
    assert all((labels[0][p] >= 1).all() for p in pos[:1]) and (labels[0][neg[0]] == 0).all()
    torch.manual_seed(3)
    ref_pos, ref_neg = BalancedPositiveNegativeSampler(256, 0.5)(labels)
    for p, n, rp, rn in zip(pos, neg, ref_pos, ref_neg, strict=True):
        assert torch.equal(p, torch.where(rp)[0]) and torch.equal(n, torch.where(rn)[0])


# ---------------------------------------------------------------------------- level mapper, pooler

def test_level_mapper_hand_example():
    pool = fc.MultiScaleRoIAlign()
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 111, 111], [0, 0, 448, 448],
                          [0, 0, 10, 10], [0, 0, 2000, 2000.0]])
    # 224 -> k0 = 4 (index 2 of P2..P5); 112 -> 3; just under 112 -> 2; 448 -> 5; tiny -> 2; huge -> 5
    assert pool.map_levels(boxes, 2, 5).tolist() == [2, 1, 0, 3, 0, 3]


def test_multiscale_roi_align_equals_torchvision():
    from collections import OrderedDict
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 4, 100 // s * 4, 152 // s * 4, generator=g) for s in (4, 8, 16, 32)]
    sizes = [(400, 600), (380, 608)]
    boxes = [random_boxes(30, size=350, generator=g, max_wh=300), random_boxes(25, size=350, generator=g, max_wh=300)]
    ref = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    expected = ref(OrderedDict((str(i), f) for i, f in enumerate(feats)), boxes, sizes)
    torch.testing.assert_close(fc.MultiScaleRoIAlign()(feats, boxes, sizes), expected, atol=1e-5, rtol=1e-5)


def test_canonical_size_is_a_setting_that_reaches_the_mapper():
    """TrainConfig's roi_canonical_size / roi_canonical_level (s0, k0) reach the model's level
    mapper: a RoI of side sqrt(wh) pools from k = floor(k0 + log2(sqrt(wh) / s0)), clamped to
    P2..P5, and the whole pooler equals torchvision's configured the same way. The defaults are
    torchvision's."""
    import inspect
    from collections import OrderedDict
    from dataclasses import replace

    reference = inspect.signature(torchvision.ops.MultiScaleRoIAlign).parameters
    assert (fc.TrainConfig().roi_canonical_size, fc.TrainConfig().roi_canonical_level) == (
        reference["canonical_scale"].default, reference["canonical_level"].default) == (224, 4)
    default_pool = fc.build_model(fc.PROFILES["smoke"], 3).roi_heads.box_roi_pool
    assert (default_pool.canonical_size, default_pool.canonical_level) == (224, 4)

    sides = torch.tensor([8.0, 20, 55, 56, 111, 112, 150, 223, 224, 300, 448, 1000])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 4, 448 // s, 448 // s, generator=g) for s in (4, 8, 16, 32)]
    levels = {}
    for s0, k0 in ((112, 4), (224, 4), (160, 5)):
        cfg = replace(fc.PROFILES["smoke"], roi_canonical_size=s0, roi_canonical_level=k0)
        pool = fc.build_model(cfg, 3).roi_heads.box_roi_pool
        expected = [min(max(math.floor(k0 + math.log2(s / s0) + 1e-6), 2), 5) - 2 for s in sides.tolist()]
        levels[s0] = pool.map_levels(boxes, 2, 5).tolist()
        assert levels[s0] == expected, (s0, k0)
        tv = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, canonical_scale=s0, canonical_level=k0)
        torch.testing.assert_close(pool(feats, [boxes], [(448, 448)]),
                                   tv(OrderedDict(zip("0123", feats)), [boxes], [(448, 448)]), atol=1e-5, rtol=1e-5)
    # halving s0 moves every RoI that is not clamped one level coarser: 112 px from P3 to P4
    assert levels[112][5] == 2 and levels[224][5] == 1
