"""Section 09: the exported ONNX file, run in onnxruntime, gives the eager model's detections on
image sizes it was never exported with, and the command line exports and predicts with it.

Two models: a smoke model trained here for two epochs (a checkpoint, as `train` writes it), and
one whose weights come from torchvision's fasterrcnn_resnet50_fpn state dict (randomly
initialised, box regression scaled down as tests/test_detector.py does). Both are exported
from a 300x400 example image and run on sizes that make the graph upsample and downsample, in
landscape and portrait, and on an image with no detections.

Tolerances: boxes within 1e-2 px, scores within 1e-4. onnxruntime's convolutions, bilinear
resize and RoiAlign sum in their own order (a few 1e-4 px on boxes here), so two detections
whose scores differ by less than that may trade places: detections are paired one to one
(same label, closest box), not by rank.
"""
import json
import pathlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import frcnn_common as fc
from tests.helpers import random_torchvision_detector, run_cli

pytest.importorskip("onnxruntime")

ROOT = pathlib.Path(fc.__file__).resolve().parent
SMOKE = replace(fc.PROFILES["smoke"], num_workers=0, epochs=1)
BOX_ATOL, SCORE_ATOL = 1e-2, 1e-4
# never the export's 300x400: smaller and larger than the resize size, landscape and portrait
SIZES = [(120, 200), (300, 170), (90, 60), (420, 560)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke checkpoint and its model (trained for one epoch), exported once."""
    out = tmp_path_factory.mktemp("deploy_smoke")
    fc.train(SMOKE, out_dir=out, progress=False)
    model, ckpt = fc.load_checkpoint(out / "last.pt")
    onnx_path = fc.export_onnx(model, out / "model.onnx", class_names=ckpt["class_names"])
    return out / "last.pt", model, ckpt, onnx_path


@pytest.fixture(scope="module")
def from_torchvision(tmp_path_factory):
    sizes = dict(min_size=160, max_size=256)
    ref = random_torchvision_detector(**sizes)
    # a random model scores hundreds of boxes near 0.05: keep the confident ones, fewer than 100,
    # so that no detection sits at the cut of detections_per_img
    model = fc.FasterRCNN(91, backbone=fc.resnet_fpn_backbone(norm_layer=nn.BatchNorm2d), box_score_thresh=0.5,
                          **sizes).eval()
    model.load_torchvision_state_dict(ref.state_dict())
    path = fc.export_onnx(model, tmp_path_factory.mktemp("deploy_tv") / "model.onnx", class_names=fc.COCO_CLASSES)
    return model, path


def images(sizes=SIZES):
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def assert_same_detections(eager: dict, onnx: dict):
    """Same number; paired one to one (same label, nearest box): boxes and scores within tolerance."""
    assert len(onnx["boxes"]) == len(eager["boxes"])
    unused = list(range(len(onnx["boxes"])))
    for box, score, label in zip(eager["boxes"], eager["scores"], eager["labels"]):
        candidates = [j for j in unused if onnx["labels"][j] == label]
        assert candidates, f"no onnxruntime detection of label {int(label)} left"
        j = min(candidates, key=lambda j: (onnx["boxes"][j] - box).abs().max().item())
        assert (onnx["boxes"][j] - box).abs().max().item() <= BOX_ATOL
        assert abs(onnx["scores"][j].item() - score.item()) <= SCORE_ATOL
        unused.remove(j)
    assert onnx["labels"].dtype == torch.int64 and onnx["boxes"].dtype == onnx["scores"].dtype == torch.float32


@torch.no_grad()
def check_model(model, onnx_path, sizes=SIZES):
    detector = fc.OnnxDetector(onnx_path, threads=1)
    counts = []
    for image in images(sizes):
        eager = model([image])[0]
        onnx = detector([image])[0]
        assert_same_detections(eager, onnx)
        counts.append(len(eager["boxes"]))
    return counts


def test_exportable_detector_is_the_model(trained):
    """The formulation that is traced (section 09), run eagerly, equals FasterRCNN to the bit."""
    _, model, _, _ = trained
    wrapper = fc.ExportableDetector(model)
    with torch.no_grad():
        for image in images():
            eager = model([image])[0]
            boxes, scores, labels = wrapper(image)
            assert torch.equal(boxes, eager["boxes"]) and torch.equal(scores, eager["scores"])
            assert torch.equal(labels, eager["labels"])


@pytest.mark.slow
def test_torchvision_weights_same_detections_on_new_sizes(from_torchvision):
    # ResNet50-FPN: two of the sizes, one upsampled landscape and one downsampled portrait
    counts = check_model(*from_torchvision, sizes=[SIZES[0], SIZES[1]])
    assert min(counts) > 0  # detections to compare on every size


def test_trained_checkpoint_same_detections_on_new_sizes(trained):
    _, model, _, onnx_path = trained
    saved, model.roi_heads.score_thresh = model.roi_heads.score_thresh, 0.0  # every box, confident or not
    try:
        path = fc.export_onnx(model, onnx_path.with_name("all.onnx"))
        counts = check_model(model, path)
    finally:
        model.roi_heads.score_thresh = saved
    assert min(counts) > 0





def test_no_detections(trained, tmp_path):
    """N = 0 is an answer the graph gives: boxes (0, 4), scores (0,), labels (0,)."""
    _, model, _, _ = trained
    saved, model.roi_heads.score_thresh = model.roi_heads.score_thresh, 1.0  # no softmax score passes
    try:
        path = fc.export_onnx(model, tmp_path / "none.onnx")
    finally:
        model.roi_heads.score_thresh = saved
    detector = fc.OnnxDetector(path)
    for image in images()[:2]:
        det = detector([image])[0]
        assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,) and det["labels"].shape == (0,)


def test_metadata_and_io(trained):
    import onnx
    _, model, ckpt, onnx_path = trained
    proto = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == list(ckpt["class_names"])
    assert proto.opset_import[0].version == fc.ONNX_OPSET
    (image,) = proto.graph.input
    dims = [d.dim_value or d.dim_param for d in image.type.tensor_type.shape.dim]
    assert dims[0] == 3 and isinstance(dims[1], str) and isinstance(dims[2], str)  # H and W dynamic
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels"]
    ops = {n.op_type for n in proto.graph.node}
    assert {"NonMaxSuppression", "RoiAlign", "Resize"} <= ops


@pytest.mark.slow
def test_cli_export_and_predict_onnx(trained, tmp_path):
    checkpoint, _, ckpt, _ = trained
    result = run_cli("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr[-3000:]
    # an RGB, a grayscale and an RGBA image: the same pixels, converted to RGB on reading
    rgb = (np.random.default_rng(0).random((150, 220, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(tmp_path / "rgba.png")
    files = [str(tmp_path / f) for f in ("rgb.png", "gray.png", "rgba.png")]
    results = {}
    for kind, flag in (("onnx", ["--onnx", str(tmp_path / "m.onnx")]), ("ckpt", ["--checkpoint", str(checkpoint)])):
        result = run_cli("predict", *flag, *files, "--out", str(tmp_path / kind), "--score-thresh", "0.0")
        assert result.returncode == 0, result.stderr[-3000:]
        assert all((tmp_path / kind / (pathlib.Path(f).stem + ".png")).is_file() for f in files)
        results[kind] = json.loads((tmp_path / kind / "predictions.json").read_text())
    for onnx, eager in zip(results["onnx"], results["ckpt"]):
        assert onnx["image"] == eager["image"] and len(onnx["boxes"]) == len(eager["boxes"])
        assert sorted(onnx["names"]) == sorted(eager["names"])
        assert set(onnx["names"]) <= set(ckpt["class_names"][1:])
        assert_same_detections({k: torch.tensor(eager[k]) for k in ("boxes", "scores", "labels")},
                               {k: torch.tensor(onnx[k]) for k in ("boxes", "scores", "labels")})


@pytest.mark.slow
def test_cli_bad_input_is_one_line(trained, tmp_path):
    checkpoint, _, _, onnx_path = trained
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    text = tmp_path / "image.png"
    text.write_text("not an image")
    cases = [("export", "--checkpoint", str(not_a_checkpoint), "--out", str(tmp_path / "m.onnx")),
             ("export", "--checkpoint", str(checkpoint), "--out", str(blocker / "m.onnx")),
             ("predict", "--onnx", str(not_a_checkpoint), str(text), "--out", str(tmp_path / "p")),
             ("predict", "--onnx", str(onnx_path), str(text), "--out", str(tmp_path / "p"))]
    for args in cases:
        result = run_cli(*args)
        assert result.returncode != 0, args
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        # one line of error (a progress bar may precede it)
        lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("predict:")]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]


def test_onnx_detector_refuses_non_rgb_tensors(trained):
    _, _, _, onnx_path = trained
    detector = fc.OnnxDetector(onnx_path)
    with pytest.raises(ValueError, match="RGB"):
        detector([torch.rand(4, 50, 60)])


def test_nms_per_class_is_batched_nms():
    """The per-class formulation keeps what batched_nms (offsets, section 03) keeps, in its order."""
    g = torch.Generator().manual_seed(5)
    xy = torch.rand(300, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(300, 2, generator=g) * 60], dim=1)
    scores, labels = torch.rand(300, generator=g), torch.randint(0, 4, (300,), generator=g)
    for max_keep in (1000, 40):
        expected = fc.batched_nms(boxes, scores, labels, 0.5, max_keep=max_keep)
        assert torch.equal(fc.nms_per_class(boxes, scores, labels, 4, 0.5, max_keep=max_keep), expected)


def test_onnx_operators_equal_ours(tmp_path):
    """ONNX NonMaxSuppression and RoiAlign, as the symbolics write them, against nms and roi_align."""
    import onnxruntime

    class Ops(nn.Module):
        def forward(self, features, rois, boxes, scores, labels):
            keep = fc.nms_per_class(boxes, scores, labels, 4, 0.5, max_keep=50)
            return fc.roi_align_onnx(features, rois, 7, 0.25, 2), keep

    g = torch.Generator().manual_seed(6)
    features = torch.randn(1, 8, 30, 40, generator=g)
    xy = torch.rand(60, 2, generator=g) * torch.tensor([150.0, 110.0]) - 10   # some outside the map
    rois = torch.cat([torch.zeros(60, 1), xy, xy + 0.5 + torch.rand(60, 2, generator=g) * 60], dim=1)  # some < 1 px
    boxes = rois[:, 1:].clone()
    scores, labels = torch.rand(60, generator=g), torch.randint(0, 4, (60,), generator=g)
    path = tmp_path / "ops.onnx"
    names = ["features", "rois", "boxes", "scores", "labels"]
    torch.onnx.export(Ops(), (features[..., :20, :20], rois[:9], boxes[:9], scores[:9], labels[:9]), str(path),
                      dynamo=False, opset_version=fc.ONNX_OPSET, input_names=names,
                      dynamic_axes={"features": {2: "h", 3: "w"}, **{n: {0: "n"} for n in names[1:]}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pooled, keep = session.run(None, {n: t.numpy() for n, t in zip(names, (features, rois, boxes, scores, labels))})
    torch.testing.assert_close(torch.from_numpy(pooled), fc.roi_align(features, rois, 7, 0.25, 2), atol=1e-5, rtol=0)
    assert torch.equal(torch.from_numpy(keep), fc.batched_nms(boxes, scores, labels, 0.5, max_keep=50))
