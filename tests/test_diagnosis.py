"""Section 08 diagnosis: TIDE's error types on planted cases whose counts and dAP are worked out
by hand, AP50 against average_precision and pycocotools, and the `errors` command."""
import json
import subprocess
import sys

import numpy as np
import pytest

import frcnn_common as fc
from test_metrics import random_case

R = 101  # COCO's recall points: an AP50 is (sum of precisions at them) / 101


def det(boxes, scores, labels):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4), "scores": np.asarray(scores, float),
            "labels": np.asarray(labels, np.int64)}


def gt(boxes, labels, crowd=None):
    target = {"boxes": np.asarray(boxes, float).reshape(-1, 4), "labels": np.asarray(labels, np.int64)}
    if crowd is not None:
        target["iscrowd"] = np.asarray(crowd, bool)
    return target


def check(result, ap50, counts, dap, fp_dap, fn_dap):
    assert result["AP50"] == pytest.approx(ap50, abs=1e-9)
    assert {k: e["count"] for k, e in result["errors"].items()} == {k: counts.get(k, 0) for k in fc.ERROR_TYPES}
    for kind in fc.ERROR_TYPES:
        assert result["errors"][kind]["dAP"] == pytest.approx(dap.get(kind, 0.0), abs=1e-9), kind
    assert result["fp_dAP"] == pytest.approx(fp_dap, abs=1e-9)
    assert result["fn_dAP"] == pytest.approx(fn_dap, abs=1e-9)


BOX = [0, 0, 100, 100]


def test_localisation_error_fixed_by_moving_the_box():
    # IoU 0.4 with its own class's gt: loc; the oracle moves it onto the gt: AP50 0 -> 1
    result = fc.error_analysis([det([[0, 0, 100, 40]], [0.9], [1])], [gt([BOX], [1])])
    check(result, 0.0, {"loc": 1}, {"loc": 1.0}, fp_dap=0.0, fn_dap=0.0)


def test_classification_errors_compete_for_their_gt():
    # two right boxes with wrong classes: both cls; the oracle relabels the better one, drops the other
    result = fc.error_analysis([det([BOX, BOX], [0.9, 0.8], [2, 3])], [gt([BOX], [1])])
    check(result, 0.0, {"cls": 2}, {"cls": 1.0}, fp_dap=0.0, fn_dap=0.0)


def test_duplicate_background_and_miss_by_hand():
    # gts g1, g2, g3 of class 1; detections by score: d1 on g1 (tp), d3 on nothing (bkg),
    # d2 on g1 again (dupe, IoU 0.95), d4 on g2 (tp); g3 has nothing: a miss.
    gts = gt([BOX, [200, 200, 300, 300], [500, 0, 600, 100]], [1, 1, 1])
    dets = det([BOX, [0, 0, 100, 95], [400, 400, 450, 450], [200, 200, 300, 300]], [0.9, 0.8, 0.85, 0.5],
               [1, 1, 1, 1])
    # ranked tp, fp, fp, tp over 3 gts: precision 1 up to recall 1/3 (34 recall points 0.00..0.33),
    # then 2/4 up to 2/3 (33 points 0.34..0.66), 0 beyond
    base = (34 + 33 * 0.5) / R
    # without either fp: precision 2/3 at recall 2/3; with g3 out of the count: recall 1/2, then 1
    # at precision 2/4 (51 points 0.00..0.50 at 1, 50 at 0.5); without both fps: 67 points at 1
    without_one_fp = (34 + 33 * 2 / 3) / R
    without_g3 = (51 + 50 * 0.5) / R
    check(fc.error_analysis([dets], [gts]), base, {"dupe": 1, "bkg": 1, "miss": 1},
          {"dupe": without_one_fp - base, "bkg": without_one_fp - base, "miss": without_g3 - base},
          fp_dap=67 / R - base, fn_dap=without_g3 - base)


def test_both_error_and_a_class_without_ground_truth():
    # a class-2 box at IoU 0.3 on a class-1 gt: both (wrong class, box off); class 2 has no gt,
    # so it is not in the AP and fixing it gains nothing. g1 is missed: nothing points at it.
    gts = gt([BOX, [200, 0, 300, 100]], [1, 1])
    dets = det([[0, 0, 100, 30], [200, 0, 300, 100]], [0.9, 0.5], [2, 1])
    check(fc.error_analysis([dets], [gts]), 51 / R, {"both": 1, "miss": 1}, {"miss": 1 - 51 / R},
          fp_dap=0.0, fn_dap=1 - 51 / R)


def test_an_image_without_objects_gives_background_errors():
    # image 0: a perfect detection; image 1 has no gt: its better-scored detection is bkg
    result = fc.error_analysis([det([BOX], [0.5], [1]), det([[10, 10, 50, 50]], [0.9], [1])],
                               [gt([BOX], [1]), gt(np.zeros((0, 4)), [])])
    # ranked fp, tp over one gt: precision 1/2 at every recall point (the envelope from the right)
    check(result, 0.5, {"bkg": 1}, {"bkg": 0.5}, fp_dap=0.5, fn_dap=0.0)


def test_loc_error_on_a_matched_gt_is_dropped_not_fixed():
    # d1 matches g; d2 (IoU 0.4 with g) is loc, but g is taken: the oracle drops it
    gts = gt([BOX, [200, 0, 300, 100]], [1, 1])
    dets = det([BOX, [0, 0, 100, 40], [200, 0, 300, 100]], [0.9, 0.8, 0.7], [1, 1, 1])
    base = (51 + 50 * 2 / 3) / R
    check(fc.error_analysis([dets], [gts]), base, {"loc": 1}, {"loc": 1 - base}, fp_dap=1 - base, fn_dap=0.0)


def test_crowd_regions_are_neither_errors_nor_misses():
    gts = gt([BOX, [200, 0, 300, 100]], [1, 1], crowd=[False, True])
    dets = det([BOX, [210, 10, 250, 50]], [0.9, 0.8], [1, 1])
    check(fc.error_analysis([dets], [gts]), 1.0, {}, {}, fp_dap=0.0, fn_dap=0.0)


@pytest.mark.parametrize("seed", range(12))
def test_ap50_equals_average_precision_and_pycocotools(seed):
    predictions, targets = random_case(seed)
    result = fc.error_analysis(predictions, targets, return_details=True)
    assert result["AP50"] == pytest.approx(fc.average_precision(predictions, targets)["AP50"], abs=1e-9)
    assert result["AP50"] == pytest.approx(fc.coco_evaluate(predictions, targets)["AP50"], abs=1e-4)
    # every kept detection has one state; fixing everything reaches the AP of perfect detections
    assert all(e["dAP"] >= 0 for e in result["errors"].values())
    assert result["AP50"] + result["fp_dAP"] <= 1 + 1e-9


def coco_files(tmp_path, results):
    ground_truth = {"images": [{"id": 1, "file_name": "a.png", "width": 400, "height": 300},
                               {"id": 2, "file_name": "b.png", "width": 400, "height": 300}],
                    "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 100, 100],
                                     "area": 10000, "iscrowd": 0}]}
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    (tmp_path / "dets.json").write_text(json.dumps(results))
    return str(tmp_path / "gt.json"), str(tmp_path / "dets.json")


def test_errors_command_json(tmp_path, capsys):
    # image 2 has no objects: its detection is a background error
    gt_path, dets_path = coco_files(tmp_path, [
        {"image_id": 1, "category_id": 7, "bbox": [0, 0, 100, 100], "score": 0.5},
        {"image_id": 2, "category_id": 7, "bbox": [0, 0, 50, 50], "score": 0.9}])
    assert fc.main(["errors", "--gt", gt_path, "--dets", dets_path, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"AP50", "errors", "fp_dAP", "fn_dAP"}
    # ranked fp, tp over one gt ("dog" has no gt and is not in the AP): precision 1/2 throughout
    assert result["AP50"] == pytest.approx(0.5)
    assert result["errors"]["bkg"]["count"] == 1 and result["errors"]["bkg"]["dAP"] == pytest.approx(0.5)


def test_errors_command_empty_results_all_missed(tmp_path, capsys):
    gt_path, dets_path = coco_files(tmp_path, [])
    assert fc.main(["errors", "--gt", gt_path, "--dets", dets_path, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["AP50"] == 0.0 and result["errors"]["miss"]["count"] == 1


@pytest.mark.parametrize("bad, words", [
    ({"image_id": 3, "category_id": 7, "bbox": [0, 0, 1, 1], "score": 0.5}, "image_id 3"),
    ({"image_id": 1, "category_id": 8, "bbox": [0, 0, 1, 1], "score": 0.5}, "category_id 8"),
    ({"image_id": 1, "category_id": 7, "bbox": [0, 0, 1], "score": 0.5}, "bbox"),
    ({"image_id": 1, "category_id": 7, "bbox": [0, 0, -1, 1], "score": 0.5}, "bbox"),
    ({"image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1]}, "score"),
])
def test_errors_command_bad_input_is_named(tmp_path, bad, words):
    gt_path, dets_path = coco_files(tmp_path, [bad])
    with pytest.raises(ValueError, match=words):
        fc.main(["errors", "--gt", gt_path, "--dets", dets_path])


def test_errors_command_bad_input_is_one_line_not_a_traceback(tmp_path):
    gt_path, dets_path = coco_files(tmp_path, [{"image_id": 5, "category_id": 7, "bbox": [0, 0, 1, 1],
                                                "score": 0.5}])
    run = subprocess.run([sys.executable, "-m", "frcnn_common", "errors", "--gt", gt_path, "--dets", dets_path],
                         capture_output=True, text=True, cwd=fc.ROOT)
    assert run.returncode == 1
    assert run.stderr.strip().startswith("error:") and len(run.stderr.strip().splitlines()) == 1
    assert "Traceback" not in run.stderr


# ---------------------------------------------------------------------------- the dashboard

import torch  # noqa: E402
from torch import nn  # noqa: E402

GT_A, GT_B, GT_C = [10., 10, 50, 50], [60., 60, 120, 120], [70., 0, 120, 40]


def planted_dataset(num_images=2, size=128):
    """Images of size x size (the model's own size: boxes are not resized), three objects each."""
    generator = torch.Generator().manual_seed(0)
    target = {"boxes": torch.tensor([GT_A, GT_B, GT_C]), "labels": torch.tensor([1, 2, 1]),
              "iscrowd": torch.zeros(3, dtype=torch.bool)}
    return [(torch.rand(3, size, size, generator=generator), dict(target, image_id=i)) for i in range(num_images)]


def small_model(norm_layer=nn.BatchNorm2d):
    backbone = fc.resnet_fpn_backbone(blocks=(1, 1, 1, 1), width=8, fpn_channels=16, norm_layer=norm_layer)
    return fc.FasterRCNN(3, backbone=backbone, min_size=128, max_size=128, representation_size=32,
                         anchor_sizes=(16, 32, 64, 128, 256))


class PlantedRPN(nn.Module):
    """Stands in for the RPN: the same three proposals for every image, in any mode."""
    proposals = torch.tensor([[12., 10, 50, 50],     # on A, IoU 0.95
                              [60., 60, 120, 84],    # on B, IoU 0.4: not a proposal of B
                              [0., 100, 20, 128]])   # on nothing

    def forward(self, batch_shape, image_sizes, features, targets=None):
        n = len(image_sizes)
        zero = features[0].sum() * 0
        losses = {"rpn_objectness": zero, "rpn_box": zero} if self.training else {}
        return [self.proposals.clone() for _ in range(n)], [torch.ones(3) for _ in range(n)], losses


def test_dashboard_counts_by_hand():
    model = small_model()
    model.rpn = PlantedRPN()
    result = fc.epoch_dashboard(model, planted_dataset(2), device="cpu", batch_size=2)
    # recall: only A has a proposal at IoU >= 0.5, in each of the 2 images
    assert result["rpn_recall"] == pytest.approx(2 / 6)
    # positive RoIs per image: the proposal on A, and A, B, C themselves (joined): 3 of 4 are gts
    assert result["gt_share"] == pytest.approx(6 / 8)
    # 6 RoIs an image (3 proposals + 3 gts), all under 224 / 4 px: every one pools from P2
    assert result["roi_levels"] == [12, 0, 0, 0]
    assert set(result["val_losses"]) == set(fc.LOSS_NAMES)
    assert result["val_losses"]["rpn_objectness"] == 0.0 and result["val_losses"]["roi_classifier"] > 0


def test_dashboard_leaves_every_weight_buffer_and_the_random_state_untouched():
    model = small_model(nn.BatchNorm2d)  # BatchNorm's running statistics move in a train-mode forward
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = fc.epoch_dashboard(model, planted_dataset(3), device="cpu", batch_size=2)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert torch.equal(rng, torch.get_rng_state())
    assert all(np.isfinite(v) for v in result["val_losses"].values())
    assert all(p.grad is None for p in model.parameters())
