"""Section 06 metrics: the from-scratch COCO metric (average_precision) against pycocotools
(coco_evaluate) on random detections and hand-computed cases, and the COCO results file."""
import json

import numpy as np
import pytest
import torch

import frcnn_common as fc

KEYS = fc.COCO_METRIC_KEYS + ("images",)


def assert_same_metrics(predictions, targets, **kwargs):
    """Both implementations, every key within 1e-4; returns the from-scratch metrics."""
    reference = fc.coco_evaluate(predictions, targets, **kwargs)
    ours = fc.average_precision(predictions, targets, **kwargs)
    assert set(reference) == set(ours) == set(KEYS)
    for key in KEYS:
        assert ours[key] == pytest.approx(reference[key], abs=1e-4), (key, ours[key], reference[key])
    return ours


def random_boxes(rng, n, image_size=640):
    """n xyxy boxes whose sides run from 4 px to 300 px (log-uniform): small, medium and large."""
    wh = np.exp(rng.uniform(np.log(4), np.log(300), size=(n, 2)))
    xy = rng.uniform(0, image_size - wh)
    return np.concatenate([xy, xy + wh], axis=1)


def random_case(seed):
    """Random ground truth and detections: jittered copies of gt boxes (true and duplicate
    detections, some with the wrong class), random false positives, crowd gts, images without
    gts, a class that only the detections use, sometimes tied scores, one image with more
    than 100 detections, image ids in shuffled order or absent."""
    rng = np.random.default_rng(seed)
    num_images, num_classes = int(rng.integers(1, 9)), int(rng.integers(1, 5))
    tied = seed % 3 == 0  # scores rounded to one decimal: many ties, across images too
    with_ids = seed % 2 == 0
    image_ids = rng.permutation(1000)[:num_images]
    predictions, targets = [], []
    for i in range(num_images):
        num_gt = int(rng.integers(0, 8)) if rng.random() > 0.2 else 0
        gt_boxes = random_boxes(rng, num_gt)
        gt_labels = rng.integers(1, num_classes + 1, size=num_gt)
        gt_crowd = rng.random(num_gt) < 0.15
        pred_boxes, pred_labels = [], []
        for box, label in zip(gt_boxes, gt_labels, strict=True):
            for _ in range(int(rng.integers(0, 3))):  # 0: missed, 2: a duplicate
                wh = box[2:] - box[:2]
                pred_boxes.append(box + rng.normal(0, 0.12, size=4) * np.concatenate([wh, wh]))
                pred_labels.append(label if rng.random() > 0.1 else rng.integers(1, num_classes + 1))
        num_fp = int(rng.integers(0, 6))
        pred_boxes.extend(random_boxes(rng, num_fp))
        # label num_classes + 1 exists only among the detections
        pred_labels.extend(rng.integers(1, num_classes + 2, size=num_fp))
        if i == 0 and seed % 4 == 1:  # over the 100-detection cap for one class in one image
            pred_boxes.extend(random_boxes(rng, 130))
            pred_labels.extend([1] * 130)
            if num_gt:
                pred_boxes.extend([gt_boxes[0]] * 3)
                pred_labels.extend([gt_labels[0]] * 3)
        pred_boxes = np.array(pred_boxes, dtype=np.float32).reshape(-1, 4)
        pred_boxes[:, 2:] = np.maximum(pred_boxes[:, 2:], pred_boxes[:, :2] + 1)
        scores = rng.random(len(pred_boxes))
        if tied:
            scores = np.round(scores, 1)
        predictions.append({"boxes": torch.from_numpy(pred_boxes),
                            "scores": torch.tensor(scores, dtype=torch.float32),
                            "labels": torch.tensor(np.array(pred_labels, dtype=np.int64))})
        target = {"boxes": torch.tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(gt_labels, dtype=torch.int64),
                  "iscrowd": torch.tensor(gt_crowd)}
        if with_ids:
            target["image_id"] = int(image_ids[i])
        targets.append(target)
    return predictions, targets


@pytest.mark.parametrize("seed", range(40))
def test_random_detections_match_pycocotools(seed):
    assert_same_metrics(*random_case(seed))


@pytest.mark.parametrize("seed", range(10))
def test_ties_everywhere_match_pycocotools(seed):
    """Boxes on a coarse grid, 4 score levels, target-given areas: identical gts, equal IoUs,
    crowd regions over regular gts and tied scores everywhere exercise every tie-break rule."""
    rng = np.random.default_rng(seed)
    predictions, targets = [], []
    for i in range(int(rng.integers(1, 6))):
        num_gt, num_dt = int(rng.integers(0, 12)), int(rng.integers(0, 40))
        grid = lambda n: np.concatenate([xy := rng.integers(0, 6, size=(n, 2)) * 16.0,
                                         xy + rng.choice([8.0, 16, 32, 48, 112], size=(n, 2))], axis=1)
        target = {"boxes": grid(num_gt), "labels": rng.integers(1, 3, num_gt),
                  "iscrowd": rng.random(num_gt) < 0.3, "image_id": 1000 * i + int(rng.integers(0, 1000))}
        if seed % 2:  # COCO annotations carry their own (mask) area, used for the area ranges
            target["area"] = rng.uniform(0, 15000, num_gt)
        targets.append(target)
        predictions.append({"boxes": grid(num_dt), "scores": rng.integers(0, 4, num_dt) / 4,
                            "labels": rng.integers(1, 3, num_dt)})
    assert_same_metrics(predictions, targets)


def test_details_match_pycocotools():
    """The PR curves notebook 06 draws are pycocotools' precision array, entry for entry."""
    predictions, targets = random_case(5)
    reference = fc.coco_evaluate(predictions, targets, return_details=True)
    ours = fc.average_precision(predictions, targets, return_details=True)
    K = len(ours["class_ids"])
    assert ours["class_ids"] == reference["class_ids"]
    assert ours["precision"].shape == (10, 101, K, 4, 3) and ours["recall"].shape == (10, K, 4, 3)
    np.testing.assert_allclose(ours["precision"], reference["precision"], atol=1e-12)
    np.testing.assert_allclose(ours["recall"], reference["recall"], atol=1e-12)
    assert ours["per_class_AP"] == pytest.approx(reference["per_class_AP"], abs=1e-12)
    defined = [ap for ap in ours["per_class_AP"].values() if ap > -1]
    assert np.mean(defined) == pytest.approx(ours["AP"], abs=1e-12)


def test_class_names_declare_every_class():
    """With class_names, the K axis holds classes 1..K, present or not; an absent one is -1."""
    predictions, targets = random_case(3)  # labels 1..num_classes + 1 <= 5
    names = ["__background__", "circle", "square", "triangle", "star", "ring", "cross"]
    reference = fc.coco_evaluate(predictions, targets, class_names=names, return_details=True)
    assert_same_metrics(predictions, targets, class_names=names)
    ours = fc.average_precision(predictions, targets, class_names=names, return_details=True)
    assert ours["class_ids"] == reference["class_ids"] == [1, 2, 3, 4, 5, 6]
    assert ours["class_names"] == names[1:] and ours["per_class_AP"][6] == -1.0
    np.testing.assert_allclose(ours["precision"], reference["precision"], atol=1e-12)
    with pytest.raises(ValueError, match="label [2-5] has no name: class_names holds 2 names"):
        fc.average_precision(predictions, targets, class_names=names[:2])


def test_no_predictions_at_all():
    _, targets = random_case(2)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.int64)}
    ours = assert_same_metrics([empty] * len(targets), targets)
    assert ours["AP"] == 0.0 and ours["AR100"] == 0.0


def test_images_without_ground_truth_count_false_positives():
    box = np.array([[10.0, 10.0, 60.0, 60.0]], np.float32)
    one = {"boxes": box, "scores": np.array([0.9]), "labels": np.array([1])}
    targets = [{"boxes": box, "labels": np.array([1])},
               {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int)}]
    # the hit ranks second, behind a false positive on the empty image: precision 1/2 at all recalls
    low = {"boxes": box, "scores": np.array([0.8]), "labels": np.array([1])}
    ours = assert_same_metrics([low, one], targets)
    assert ours["AP"] == pytest.approx(0.5, abs=1e-12)


def test_tied_scores():
    _, targets = random_case(4)
    predictions = []
    for target in targets:  # exact copies and shifted copies of each gt, all with the same score
        boxes = torch.cat([target["boxes"], target["boxes"] + 20])
        predictions.append({"boxes": boxes, "scores": torch.full((len(boxes),), 0.5),
                            "labels": torch.cat([target["labels"], target["labels"]])})
    assert_same_metrics(predictions, targets)


def test_hand_computed_example():
    """Two gts, three detections, one class; all boxes are small (area < 32^2).

    gt A = [0, 0, 10, 10], gt B = [20, 20, 30, 30].
    d1 = A exactly, score 0.9: IoU 1 with A.
    d2 = [50, 50, 60, 60], score 0.8: overlaps nothing, a false positive.
    d3 = [20, 20, 30, 35], score 0.7: IoU with B = 100 / 150 = 0.667.
    At t in {0.50, 0.55, 0.60, 0.65} d3 hits B. Ranked: TP, FP, TP;
        precision 1, 1/2, 2/3; recall 1/2, 1/2, 1; monotone precision 1, 2/3, 2/3.
        The 51 recall points 0.00..0.50 read 1, the 50 points 0.51..1.00 read 2/3:
        AP_t = (51 + 50 * 2/3) / 101 = 0.834983.
    At the 6 thresholds 0.70..0.95 d3 misses: TP, FP, FP; recall stops at 1/2:
        AP_t = 51 / 101 = 0.504950.
    AP = (4 * 0.834983 + 6 * 0.504950) / 10 = 0.636964; AP50 = 0.834983; AP75 = 0.504950;
    APs = AP; no gt is medium or large: APm = APl = -1.
    AR100 = (4 * 1 + 6 * 1/2) / 10 = 0.7; AR1 keeps only d1 (one detection per image): 0.5.
    """
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 1]),
                "image_id": 7}]
    predictions = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 35]]),
                    "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 1, 1])}]
    ap_hit, ap_miss = (51 + 50 * 2 / 3) / 101, 51 / 101
    expected = {"AP": (4 * ap_hit + 6 * ap_miss) / 10, "AP50": ap_hit, "AP75": ap_miss,
                "APs": (4 * ap_hit + 6 * ap_miss) / 10, "APm": -1.0, "APl": -1.0,
                "AR1": 0.5, "AR10": 0.7, "AR100": 0.7, "ARs": 0.7, "ARm": -1.0, "ARl": -1.0, "images": 1}
    assert expected["AP"] == pytest.approx(0.636964, abs=1e-6)
    ours = assert_same_metrics(predictions, targets)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


def test_perfect_predictions_give_ap_one():
    rng = np.random.default_rng(0)
    targets, predictions = [], []
    for image_id in range(6):
        # sides of 10, 50 and 200 px: one box in each area range, in every image
        sides = np.array([10.0, 50.0, 200.0])
        xy = rng.uniform(0, 400, size=(3, 2))
        boxes = np.concatenate([xy, xy + sides[:, None]], axis=1).astype(np.float32)
        labels = rng.integers(1, 4, size=3)
        targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                        "image_id": image_id})
        predictions.append({"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(rng.random(3)),
                            "labels": torch.from_numpy(labels)})
    ours = assert_same_metrics(predictions, targets)
    for key in fc.COCO_METRIC_KEYS:
        if key != "AR1":  # AR1 allows one detection per image and class, and classes repeat
            # 1 up to COCO's tp / (tp + fp + eps), a rounding of 1e-16
            assert ours[key] == pytest.approx(1.0, abs=1e-12), key


def test_crowd_region_neither_helps_nor_hurts():
    """Three detections inside a crowd region are ignored, not false positives: AP stays 1.
    Crowd IoU is intersection / area(detection): a 10x10 box inside a 100x100 region scores 1."""
    targets = [{"boxes": torch.tensor([[0.0, 0, 40, 40], [100, 100, 200, 200]]),
                "labels": torch.tensor([1, 1]),
                "iscrowd": torch.tensor([False, True])}]
    assert fc._coco_iou(np.array([[110.0, 110, 120, 120]]), targets[0]["boxes"].double().numpy(),
                        np.array([False, True]))[0, 1] == 1.0
    predictions = [{"boxes": torch.tensor([[110.0, 110, 120, 120], [0, 0, 40, 40], [150, 150, 170, 170],
                                           [120, 100, 200, 190]]),
                    "scores": torch.tensor([0.95, 0.9, 0.8, 0.7]), "labels": torch.tensor([1, 1, 1, 1])}]
    ours = assert_same_metrics(predictions, targets)
    assert ours["AP"] == pytest.approx(1.0, abs=1e-12) and ours["AR100"] == 1.0


def test_regular_gt_beats_a_better_crowd_match():
    """A detection overlapping a regular gt and a crowd region takes the regular gt, even when
    the crowd IoU is higher (pycocotools sorts ignored gts last and stops there once matched).

    gt R = [0, 0, 40, 40]; crowd C = [0, 0, 100, 100]; d = [0, 0, 40, 44].
    IoU(d, R) = 1600 / 1760 = 0.909; crowd IoU(d, C) = 1760 / 1760 = 1.
    t = 0.50..0.90 (9 thresholds): d hits R, AP_t = 1. t = 0.95: d falls to C and is ignored,
    R is missed, AP_t = 0. So AP = 0.9 (taking C everywhere would give 0).
    """
    targets = [{"boxes": torch.tensor([[0.0, 0, 40, 40], [0, 0, 100, 100]]), "labels": torch.tensor([1, 1]),
                "iscrowd": torch.tensor([False, True])}]
    predictions = [{"boxes": torch.tensor([[0.0, 0, 40, 44]]), "scores": torch.tensor([0.9]),
                    "labels": torch.tensor([1])}]
    ours = assert_same_metrics(predictions, targets)
    assert ours["AP"] == pytest.approx(0.9, abs=1e-12) and ours["AR100"] == pytest.approx(0.9)


def test_equal_ious_go_to_the_last_gt():
    """Among gts of equal IoU, pycocotools' `>=` scan keeps the last; it decides what is left.

    G1 = [0, 0, 10, 10], G2 = [10, 0, 20, 10]; d1 = [0, 0, 20, 10] (score 0.9) has IoU
    100 / 200 = 0.5 with both; d2 = G1 (score 0.8). At t = 0.5 d1 takes G2 (the last), d2 takes
    G1: two hits, AP_t = 1 (taking G1 first would leave d2 a false positive and AP_t = 0.5).
    At t > 0.5 d1 misses: FP then TP at recall 1/2, AP_t = 51 * 0.5 / 101.
    """
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10]]), "labels": torch.tensor([1, 1])}]
    predictions = [{"boxes": torch.tensor([[0.0, 0, 20, 10], [0, 0, 10, 10]]),
                    "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])}]
    ours = assert_same_metrics(predictions, targets)
    assert ours["AP50"] == pytest.approx(1.0, abs=1e-12)
    assert ours["AP"] == pytest.approx((1 + 9 * 51 * 0.5 / 101) / 10, abs=1e-12)


def test_more_than_100_detections_per_image_and_class():
    """COCO keeps the 100 best detections per image and class: a hit ranked 101st is lost."""
    gt = torch.tensor([[0.0, 0, 50, 50]])
    far = torch.tensor([[300.0, 300, 350, 350]]).repeat(100, 1)
    boxes = torch.cat([far, gt])
    scores = torch.cat([torch.linspace(0.9, 0.5, 100), torch.tensor([0.1])])
    targets = [{"boxes": gt, "labels": torch.tensor([1])}]
    labels = torch.ones(101, dtype=torch.int64)
    ours = assert_same_metrics([{"boxes": boxes, "scores": scores, "labels": labels}], targets)
    assert ours["AP"] == 0.0 and ours["AR100"] == 0.0
    # with the hit scored 0.55 instead it ranks among the 100 kept, behind n false positives:
    # recall 1 at precision 1 / (n + 1), at every threshold and recall point
    scores[-1] = 0.55
    n = int((scores[:100] > 0.55).sum())
    ours = assert_same_metrics([{"boxes": boxes, "scores": scores, "labels": labels}], targets)
    assert ours["AR100"] == 1.0 and ours["AP"] == pytest.approx(1 / (n + 1), abs=1e-9)


def test_numpy_and_torch_inputs_agree():
    predictions, targets = random_case(7)
    as_numpy = lambda d: {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in d.items()}
    expected = fc.average_precision(predictions, targets)
    numpy_predictions, numpy_targets = [as_numpy(p) for p in predictions], [as_numpy(t) for t in targets]
    assert fc.average_precision(numpy_predictions, numpy_targets) == expected
    if torch.cuda.is_available():
        on_gpu = lambda d: {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in d.items()}
        assert fc.average_precision([on_gpu(p) for p in predictions], targets) == expected


def test_undefined_metrics_are_minus_one():
    """No ground truth anywhere: every metric is undefined (-1), in both implementations."""
    box = torch.tensor([[0.0, 0, 10, 10]])
    predictions = [{"boxes": box, "scores": torch.tensor([0.5]), "labels": torch.tensor([2])}]
    no_gt = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    ours = assert_same_metrics(predictions, [no_gt])
    assert all(ours[key] == -1.0 for key in fc.COCO_METRIC_KEYS)


def test_bad_input_is_named():
    box = torch.tensor([[0.0, 0, 10, 10]])
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        fc.average_precision([{}, {}], [{}])
    with pytest.raises(ValueError, match="label 0"):
        fc.average_precision([{"boxes": box, "scores": torch.ones(1), "labels": torch.tensor([0])}],
                             [{"boxes": box, "labels": torch.tensor([1])}])
    with pytest.raises(ValueError, match="image_id 3 appears twice"):
        t = {"boxes": box, "labels": torch.tensor([1]), "image_id": 3}
        p = {"boxes": box, "scores": torch.ones(1), "labels": torch.tensor([1])}
        fc.coco_evaluate([p, p], [t, t])


def test_save_coco_results_loads_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    predictions, targets = random_case(1)
    image_ids = [int(t.get("image_id", i)) for i, t in enumerate(targets)]
    num_labels = 1 + max(int(p["labels"].max()) for p in predictions if len(p["labels"]))
    label_to_cat_id = {label: 10 * label + 3 for label in range(1, num_labels)}  # COCO ids have gaps
    path = fc.save_coco_results(tmp_path / "out" / "detections.json", predictions, image_ids, label_to_cat_id)

    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in image_ids],
                  "categories": [{"id": c, "name": str(c)} for c in label_to_cat_id.values()],
                  "annotations": []}
    gt.createIndex()
    results = gt.loadRes(str(path))
    anns = results.loadAnns(results.getAnnIds())
    assert len(anns) == sum(len(p["boxes"]) for p in predictions) == len(json.loads(path.read_text()))
    first = next(i for i, p in enumerate(predictions) if len(p["boxes"]))
    x1, y1, x2, y2 = predictions[first]["boxes"][0].tolist()
    ann = results.loadAnns(results.getAnnIds(imgIds=[image_ids[first]]))[0]
    assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert ann["category_id"] == label_to_cat_id[int(predictions[first]["labels"][0])]
    assert ann["score"] == pytest.approx(float(predictions[first]["scores"][0]))
    with pytest.raises(ValueError, match="no COCO category id"):
        fc.to_coco_results(predictions, image_ids, {})


def test_annotation_areas_sort_objects_by_size_as_pycocotools_does_on_the_file(tmp_path):
    """COCO's APs/APm/APl sort objects by the annotation's "area" (COCO 2017: the segmentation's),
    not by the box's. A file whose areas differ from its boxes, read by CocoDetection and scored
    by both our evaluators, against pycocotools run on the file itself."""
    from PIL import Image
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(7)
    categories = [{"id": 3, "name": "a"}, {"id": 8, "name": "b"}]
    images, annotations, results = [], [], []
    for image_id in (5, 2, 9, 4):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 640, "height": 640})
        Image.new("RGB", (640, 640)).save(tmp_path / f"{image_id}.png")
        for box in random_boxes(rng, 8):
            x, y, w, h = box[0], box[1], box[2] - box[0], box[3] - box[1]
            # an outline fills 0.2..1 of its box, sometimes more (a box trimmed to the image)
            area = float(w * h * rng.choice([0.2, 0.5, 1.0, 3.0]))
            cat = int(rng.choice([3, 8]))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [float(x), float(y), float(w), float(h)], "area": area,
                                "iscrowd": int(rng.random() < 0.1)})
            for _ in range(int(rng.integers(0, 3))):  # jittered detections, some duplicates
                jitter = rng.normal(0, 0.1, size=4) * [w, h, w, h]
                results.append({"image_id": image_id, "category_id": cat, "score": float(rng.random()),
                                "bbox": [float(x + jitter[0]), float(y + jitter[1]),
                                         float(max(w + jitter[2], 1)), float(max(h + jitter[3], 1))]})
        for box in random_boxes(rng, 3):  # false positives
            results.append({"image_id": image_id, "category_id": int(rng.choice([3, 8])),
                            "score": float(rng.random()),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))

    gt = COCO(str(ann_file))
    coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    reference = dict(zip(fc.COCO_METRIC_KEYS, coco_eval.stats))

    ds = fc.CocoDetection(tmp_path, ann_file)
    targets = [ds.target(i) for i in range(len(ds))]
    assert all(t["area"].dtype == torch.float32 for t in targets)
    predictions = []
    for image_id in ds.image_ids:
        mine = [r for r in results if r["image_id"] == image_id]
        boxes = torch.tensor([r["bbox"] for r in mine], dtype=torch.float64).reshape(-1, 4)
        predictions.append({"boxes": torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1),
                            "scores": torch.tensor([r["score"] for r in mine]),
                            "labels": torch.tensor([ds.cat_id_to_label[r["category_id"]] for r in mine])})
    for evaluate in (fc.coco_evaluate, fc.average_precision):
        ours = evaluate(predictions, targets)
        for key in fc.COCO_METRIC_KEYS:
            assert ours[key] == pytest.approx(reference[key], abs=1e-4), (evaluate.__name__, key)
    # the case can tell the two apart: scored by box area, the size metrics differ
    by_box = fc.average_precision(predictions, [{k: v for k, v in t.items() if k != "area"} for t in targets])
    assert any(abs(by_box[k] - reference[k]) > 0.01 for k in ("APs", "APm", "APl"))
