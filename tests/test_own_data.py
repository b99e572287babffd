"""Your own data (notebook 07): COCO and VOC folders as annotation tools write them, seeded splits,
check-data's report (every problem with its file, the anchors' fit), and transfer learning (--init).

Every test writes its own small files under tmp_path; expected values are worked out by hand.
"""
import os
import subprocess
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from PIL import Image

import frcnn_common as fc

SMOKE = fc.PROFILES["smoke"]


# ---- helpers ---------------------------------------------------------------------------------

def samples(count=10, size=(48, 64)):
    """count images (H, W) = size, each with one "fox" and, on odd ones, one "owl" (xyxy px)."""
    out = []
    for i in range(1, count + 1):
        pixels = np.full((*size, 3), 10 * i, np.uint8)      # a different grey each: no duplicate images
        objects = [("fox", [4, 6, 20, 30])] + ([("owl", [30, 10, 60, 40])] if i % 2 else [])
        out.append((f"{i:03d}.png", pixels, objects))
    return out


def report_of(data, root, profile=SMOKE):
    train, val = fc.own_datasets(data, root, strict=False, quiet=True)
    return fc.check_data({"train": train, "val": val}, min_size=profile.min_size, max_size=profile.max_size,
                         anchor_sizes=profile.anchor_sizes, progress=False)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "frcnn_common", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(fc.ROOT)}, timeout=300)


# ---- folders as the tools write them ---------------------------------------------------------

def test_voc_without_imagesets_labelimg_layout(tmp_path, capsys):
    root = fc.write_voc_folder(tmp_path / "labelimg", samples(10))        # xml beside each image
    assert sorted(p.name for p in root.iterdir())[:2] == ["001.png", "001.xml"]
    train, val = fc.own_datasets("voc", root, seed=0)
    out = capsys.readouterr().out
    assert "classes (from the annotations): fox, owl\n" in out            # one line
    assert "seeded split (seed 0)" in out and "8 train and 2 val" in out
    assert train.class_names == val.class_names == ("__background__", "fox", "owl")
    assert len(train) == 8 and len(val) == 2
    names = {train.images[i]["file_name"] for i in range(len(train))} | {val.images[i]["file_name"] for i in range(len(val))}
    assert names == {f"{i:03d}.png" for i in range(1, 11)}               # every image, once
    image, target = val[0]
    assert image.shape == (3, 48, 64)
    # VOC's 1-based inclusive corners back to ours: the writer's box exactly
    assert target["boxes"][0].tolist() == [4, 6, 20, 30] and target["labels"][0].item() == 1
    again = fc.own_datasets("voc", root, seed=0, quiet=True)[1]
    assert [i["file_name"] for i in again.images] == [i["file_name"] for i in val.images]


def test_voc_class_names_real_voc_keeps_its_20(tmp_path):
    root = fc.write_voc_folder(tmp_path / "v", [("a.png", np.zeros((20, 20, 3), np.uint8), [("dog", [1, 1, 9, 9])]),
                                                ("b.png", np.ones((20, 20, 3), np.uint8), [("person", [2, 2, 8, 8])])])
    assert fc.voc_class_names(fc.voc_xml_files(root)) == fc.VOC_CLASSES
    assert fc.VOCDetection(root).target(1)["labels"].tolist() == [fc.VOC_CLASSES.index("person")]


def test_split_ids_is_seeded_and_order_free():
    ids = list(range(1, 21))
    train, val = fc.split_ids(ids, seed=0)
    assert len(val) == 4 and sorted(train + val) == ids and not set(train) & set(val)
    assert fc.split_ids(ids[::-1], seed=0) == (train, val)                # the order given does not matter
    assert fc.split_ids(ids, seed=1)[1] != val
    assert fc.split_ids([7], seed=0) == ([7], [])


def test_coco_one_json_for_all_is_split_by_seed(tmp_path, capsys):
    root = fc.write_coco_folder(tmp_path / "cvat", samples(10), ("__background__", "fox", "owl"))
    assert (root / "annotations" / "instances_default.json").is_file() and (root / "images" / "001.png").is_file()
    assert fc.coco_files(root) == {"all": (root / "images", root / "annotations" / "instances_default.json")}
    train, val = fc.own_datasets("coco", root, seed=3)
    out = capsys.readouterr().out
    assert "instances_default.json holds all 10 images: seeded split (seed 3) into 8 train and 2 val" in out
    assert "classes (from instances_default.json): fox, owl\n" in out
    expected_train, expected_val = fc.split_ids(range(1, 11), seed=3)
    assert train.image_ids == expected_train and val.image_ids == expected_val
    assert val.image_ids == fc.own_datasets("coco", root, seed=3, quiet=True)[1].image_ids
    # each split holds its own images' boxes only: image 1 has 2 objects, image 2 one
    for ds in (train, val):
        for i, image_id in enumerate(ds.image_ids):
            assert len(ds.target(i)["boxes"]) == (2 if image_id % 2 else 1)


def test_coco_one_json_per_split_roboflow_layout(tmp_path):
    for split in ("train", "valid"):
        fc.write_coco_folder(tmp_path / "tmp" / split, samples(3), ("__background__", "fox", "owl"))
        (tmp_path / "rf" / split).mkdir(parents=True)
        for p in (tmp_path / "tmp" / split / "images").iterdir():
            p.rename(tmp_path / "rf" / split / p.name)
        (tmp_path / "tmp" / split / "annotations" / "instances_default.json").rename(
            tmp_path / "rf" / split / "_annotations.coco.json")
    files = fc.coco_files(tmp_path / "rf")
    assert files == {"train": (tmp_path / "rf" / "train", tmp_path / "rf" / "train" / "_annotations.coco.json"),
                     "val": (tmp_path / "rf" / "valid", tmp_path / "rf" / "valid" / "_annotations.coco.json")}
    train, val = fc.own_datasets("coco", tmp_path / "rf")
    assert len(train) == len(val) == 3 and train[0][0].shape == (3, 48, 64)


# ---- check-data: every kind of problem, with its file ------------------------------------------

def break_voc(root, kind):
    """Make one problem of `kind` in a clean write_voc_folder(root, samples(6)); return the file named."""
    xml = root / "003.xml"
    text = xml.read_text()
    if kind == "degenerate box":
        xml.write_text(text.replace("<xmax>20</xmax>", "<xmax>3</xmax>"))
    elif kind == "box outside the image":
        xml.write_text(text.replace("<xmin>5</xmin>", "<xmin>100</xmin>").replace("<xmax>20</xmax>", "<xmax>120</xmax>"))
    elif kind == "box partly outside the image":
        xml.write_text(text.replace("<xmax>20</xmax>", "<xmax>90</xmax>"))
    elif kind == "missing image":
        (root / "003.png").unlink()
        return root / "003.png"
    elif kind == "unreadable image":
        (root / "003.png").write_bytes(b"not an image")
        return root / "003.png"
    elif kind == "image size differs":
        Image.new("RGB", (50, 48)).save(root / "003.png")
        return root / "003.png"
    elif kind == "duplicate image":
        (root / "003.png").write_bytes((root / "001.png").read_bytes())
        return root / "003.png"
    elif kind == "duplicate box":
        cat = text[text.index("<object>"):text.index("</object>") + len("</object>")]
        xml.write_text(text.replace(cat, cat + cat))
    return xml


@pytest.mark.parametrize("kind", ["degenerate box", "box outside the image", "box partly outside the image",
                                  "missing image", "unreadable image", "image size differs", "duplicate image",
                                  "duplicate box"])
def test_check_data_finds_each_problem_with_its_file(tmp_path, kind):
    root = fc.write_voc_folder(tmp_path / "voc", samples(6))
    assert report_of("voc", root).problems == []                            # clean to begin with
    named = break_voc(root, kind)
    with pytest.warns(fc.DatasetWarning) if "box" in kind and kind != "duplicate box" else _nothing():
        report = report_of("voc", root)
    assert [(p[1], p[2]) for p in report.problems] == [(kind, str(named))]
    assert bool(report.errors) == (fc.PROBLEM_KINDS[kind] == "error")
    assert f"{kind}: {named}" in str(report)


def test_check_data_finds_unknown_classes_and_images(tmp_path):
    root = fc.write_coco_folder(tmp_path / "coco", samples(4), ("__background__", "fox", "owl"))
    ann = root / "annotations" / "instances_default.json"
    data = fc._read_coco_json(ann)
    data["annotations"][0]["category_id"] = 9
    data["annotations"][1]["image_id"] = 99
    fc._write_json_atomic(ann, data)
    with pytest.raises(fc.DatasetError, match="category_id 9, which is not in 'categories'"):
        fc.own_datasets("coco", root, quiet=True)                          # training refuses it, as before
    report = report_of("coco", root)
    assert [p[1] for p in report.problems] == ["unknown class", "unknown image"]   # once, though both splits read them
    assert all(p[2] == str(ann) and p[0] == "error" for p in report.problems)
    # VOC: a class outside the names given
    voc = fc.write_voc_folder(tmp_path / "voc", samples(4))
    ds = fc.VOCDetection(voc, ["fox"], strict=False)   # no "owl"
    assert [(p[0], p[1]) for p in ds.problems] == [("unknown class", str(voc / "001.xml")),
                                                   ("unknown class", str(voc / "003.xml"))]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_check_data_counts(tmp_path):
    items = samples(5)
    items[1] = (items[1][0], items[1][1], [])                               # an empty image
    report = report_of("voc", fc.write_voc_folder(tmp_path / "voc", items))
    assert sum(report.images.values()) == 5 and sum(report.empty_images.values()) == 1
    assert report.objects == {"fox": 4, "owl": 3}
    assert len(report.box_sides) == len(report.best_iou) == 7


# ---- the anchors' fit ------------------------------------------------------------------------

def test_anchor_fit_by_hand():
    # A 160x160 image in the smoke profile (min_size 160, max_size 256) is not resized. Box 1 is the
    # P3 anchor of size 32, ratio 1, at grid point (4, 4) (stride 8): [-16, -16, 16, 16] + 32. Box 2 is
    # 2x2 px: its best anchor, P2's 16x16 at (100, 100), covers it: IoU = 4 / 256.
    boxes = torch.tensor([[16.0, 16.0, 48.0, 48.0], [100.0, 100.0, 102.0, 102.0]])
    best = fc.best_anchor_iou([(160, 160)], [boxes], min_size=160, max_size=256, anchor_sizes=SMOKE.anchor_sizes)
    assert best.tolist() == [1.0, 4 / 256]
    report = fc.DataReport({"train": 1}, {"train": 0}, {}, [], np.zeros(2), best.numpy(), SMOKE.anchor_sizes, 160, 256)
    assert report.anchor_fit(0.7) == report.anchor_fit(0.3) == 0.5        # box 1 counted, box 2 not
    # A 24x24 box centred on (32, 32) lies inside P3's 32x32 anchor there: IoU (24/32)^2 = 0.5625 (P2's
    # 16x16 reaches 256/576). Drawn twice as large in a 320x320 image, the resize halves it: the same.
    box = torch.tensor([[20.0, 20.0, 44.0, 44.0]])
    assert fc.best_anchor_iou([(160, 160), (320, 320)], [box, box * 2], min_size=160, max_size=256,
                              anchor_sizes=SMOKE.anchor_sizes).tolist() == [0.5625, 0.5625]


def test_anchor_fit_equals_all_anchors():
    """The nearest-centre shortcut gives the best IoU over every anchor of the image's grid."""
    gen = torch.Generator().manual_seed(0)
    sizes = [(int(h), int(w)) for h, w in torch.randint(40, 400, (16, 2), generator=gen)]
    boxes = []
    for h, w in sizes:
        xy = torch.rand(5, 2, generator=gen) * torch.tensor([w, h]) * 0.8
        wh = torch.rand(5, 2, generator=gen) * torch.tensor([w, h]) * 0.6 + 2
        boxes.append(torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]).float())], 1))
    cfg = SMOKE                                     # a tiny backbone: its feature maps' sizes are what count
    model = fc.build_model(cfg, 2).eval()
    expected = []
    for (h, w), b in zip(sizes, boxes, strict=True):
        with torch.no_grad():
            batch, image_sizes, targets = model.transform([torch.zeros(3, h, w)], [{"boxes": b}])
            anchors = model.rpn.anchor_generator(batch.shape[-2:], model.backbone(batch))
        expected.append(fc.box_iou(targets[0]["boxes"], anchors).max(1).values)
    got = fc.best_anchor_iou(sizes, boxes, min_size=cfg.min_size, max_size=cfg.max_size, anchor_sizes=cfg.anchor_sizes)
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=0)


def test_low_anchor_fit_gets_a_suggestion(tmp_path):
    # every object 40x40 px in a 160x160 image, centred on P3's grid (stride 8): between the 32 and 64
    # anchors, IoU (32/40)^2 = 0.64 at best. Anchors x 2^(1/4) give 38 at P3: IoU (38/40)^2 = 0.9025.
    items = [(f"{i}.png", np.full((160, 160, 3), i * 20, np.uint8), [("a", [20, 20, 60, 60]), ("a", [84, 84, 124, 124])])
             for i in range(1, 6)]
    report = report_of("voc", fc.write_voc_folder(tmp_path / "voc", items))
    assert report.anchor_fit(0.7) == 0.0 and report.anchor_fit(0.3) == 1.0
    np.testing.assert_allclose(report.best_iou, [0.64] * 10, rtol=1e-6)
    assert report.suggestion == {"anchor_sizes": (19, 38, 76, 152, 304), "min_size": 160, "max_size": 256,
                                 "fit_07": 1.0, "fit_03": 1.0}
    assert "low: anchor_sizes=" in str(report)


# ---- train and the CLI -----------------------------------------------------------------------

def test_check_data_cli_exit_status(tmp_path):
    root = fc.write_voc_folder(tmp_path / "voc", samples(6))
    assert fc.main(["check-data", "--data", "voc", "--data-root", str(root), "--profile", "smoke"]) == 0
    (root / "002.png").unlink()
    assert fc.main(["check-data", "--data", "voc", "--data-root", str(root), "--profile", "smoke"]) == 1


def test_train_stops_before_the_first_epoch_on_errors(tmp_path, capsys):
    root = fc.write_voc_folder(tmp_path / "voc", samples(10))
    (root / "004.png").unlink()
    cfg = replace(SMOKE, data="voc", epochs=1)
    with pytest.raises(fc.DataCheckFailed, match=r"1 error\(s\) in .*004.png: missing image; training not started"):
        fc.train(cfg, data_root=root, out_dir=tmp_path / "run", device="cpu", progress=False)
    out = capsys.readouterr().out
    assert "missing image" in out and "anchor fit" in out                 # the report, printed
    assert "epoch 1" not in out and not (tmp_path / "run").exists()


def smoke_checkpoint(tmp_path, class_names):
    model = fc.build_model(SMOKE, len(class_names))
    path = tmp_path / "source.pt"
    fc.save_checkpoint({"model": model.state_dict(), "class_names": list(class_names), "config": asdict(SMOKE)}, path)
    return path, model.state_dict()


def test_init_with_other_classes_replaces_only_the_predictor(tmp_path, capsys):
    path, source = smoke_checkpoint(tmp_path, fc.SHAPES_CLASSES)
    model = fc.build_model(SMOKE, 3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    fc.init_from_checkpoint(model, path, ("__background__", "fox", "owl"))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "classes differ (6 -> 2): the box predictor starts afresh" in out[0]
    loaded = model.state_dict()
    predictor = [k for k in loaded if k.startswith(fc.PREDICTOR)]
    assert len(predictor) == 4                                             # cls_score and bbox_pred
    for key, value in loaded.items():
        assert torch.equal(value, fresh[key] if key in predictor else source[key]), key
    # the same classes: everything is loaded, the predictor too
    same = fc.init_from_checkpoint(fc.build_model(SMOKE, 7), path, fc.SHAPES_CLASSES).state_dict()
    assert all(torch.equal(same[k], source[k]) for k in source)


def test_init_from_torchvision_state_dict(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    model = fc.FasterRCNN(num_classes=3)
    fc.init_from_checkpoint(model, path, ("__background__", "fox", "owl"), verbose=False)
    converted = model.from_torchvision_keys(reference.state_dict())
    for key, value in model.state_dict().items():
        if not key.startswith(fc.PREDICTOR):
            assert torch.equal(value, converted[key]), key
    assert model.roi_heads.box_predictor.cls_score.out_features == 3


def test_init_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="--init .*missing.pt: no such file"):
        fc.init_from_checkpoint(fc.build_model(SMOKE, 3), tmp_path / "missing.pt", ("__background__", "a", "b"))
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(ValueError, match="junk.pt: not a checkpoint"):
        fc.init_from_checkpoint(fc.build_model(SMOKE, 3), tmp_path / "junk.pt", ("__background__", "a", "b"))
    path, _ = smoke_checkpoint(tmp_path, fc.SHAPES_CLASSES)
    with pytest.raises(ValueError, match=r"weights do not fit this model .*same architecture"):
        fc.init_from_checkpoint(fc.build_model(fc.PROFILES["cpu"], 3), path, ("__background__", "a", "b"))
    # through the CLI: one line on stderr, no traceback
    root = fc.write_voc_folder(tmp_path / "voc", samples(10))
    result = run_cli("train", "--profile", "smoke", "--data", "voc", "--data-root", str(root), "--epochs", "1",
                     "--out", str(tmp_path / "run"), "--init", str(tmp_path / "missing.pt"), "--no-progress",
                     cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: --init {tmp_path / 'missing.pt'}: no such file"]


def test_init_then_frozen_backbone_trains_the_heads_only(tmp_path, capsys):
    path, source = smoke_checkpoint(tmp_path, fc.SHAPES_CLASSES)
    root = fc.write_voc_folder(tmp_path / "voc", samples(10))
    cfg = replace(SMOKE, data="voc", epochs=1, batch_size=4)
    fc.train(cfg, data_root=root, out_dir=tmp_path / "run", device="cpu", progress=False, init=path,
             freeze_backbone_epochs=1)
    assert "classes differ (6 -> 2)" in capsys.readouterr().out
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert trained["class_names"] == ["__background__", "fox", "owl"]     # saved in the checkpoint
    weights = trained["model"]
    backbone = [k for k in weights if k.startswith("backbone.") and "running" not in k and "num_batches" not in k]
    assert backbone and all(torch.equal(weights[k], source[k]) for k in backbone)
    assert not torch.equal(weights["rpn.head.conv.weight"], source["rpn.head.conv.weight"])


# ---- the readers' remaining layouts -------------------------------------------------------------

def coco_2017_folder(root):
    """COCO 2017 as downloaded: instances_, captions_ and person_keypoints_ jsons per split in
    annotations/, images in train2017/ and val2017/."""
    for split, count in (("train2017", 4), ("val2017", 2)):
        fc.write_coco_folder(root / "tmp", samples(count), ("__background__", "fox", "owl"))
        (root / "tmp" / "images").rename(root / split)
        (root / "annotations").mkdir(exist_ok=True)
        (root / "tmp" / "annotations" / "instances_default.json").rename(root / "annotations" / f"instances_{split}.json")
        for other in ("captions", "person_keypoints"):   # not boxes: must be left alone
            (root / "annotations" / f"{other}_{split}.json").write_text('{"images": [], "annotations": []}')
    return root


def test_coco_2017_with_captions_and_keypoints_beside_instances(tmp_path):
    root = coco_2017_folder(tmp_path / "coco")
    assert fc.coco_files(root) == {
        "train": (root / "train2017", root / "annotations" / "instances_train2017.json"),
        "val": (root / "val2017", root / "annotations" / "instances_val2017.json")}
    train, val = fc.own_datasets("coco", root, quiet=True)
    assert len(train) == 4 and len(val) == 2 and train.class_names == ("__background__", "fox", "owl")


def test_coco_label_studio_result_json(tmp_path):
    fc.write_coco_folder(tmp_path / "ls", samples(5), ("__background__", "fox", "owl"))
    root = tmp_path / "ls"
    (root / "annotations" / "instances_default.json").rename(root / "result.json")   # Label Studio's name
    (root / "annotations").rmdir()
    assert fc.coco_files(root) == {"all": (root / "images", root / "result.json")}
    train, val = fc.own_datasets("coco", root, seed=0, quiet=True)
    assert len(train) + len(val) == 5 and len(val) == 1


def test_coco_several_jsons_not_one_per_split_is_an_error(tmp_path):
    fc.write_coco_folder(tmp_path / "x", samples(3), ("__background__", "fox", "owl"))
    ann = tmp_path / "x" / "annotations"
    (ann / "instances_default.json").rename(ann / "part1.json")
    (ann / "part2.json").write_text((ann / "part1.json").read_text())
    with pytest.raises(fc.DatasetError, match=r"found 2 json files \(part1.json, part2.json\) but not one for "
                                              r"train and one for val, nor a single one for all"):
        fc.coco_files(tmp_path / "x")


def test_voc_with_train_txt_but_no_val_txt_names_the_missing_file(tmp_path):
    root = fc.write_voc_folder(tmp_path / "voc", samples(10))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i:03d}\n" for i in range(1, 9)))
    with pytest.raises(fc.DatasetError, match=r"ImageSets/Main/val.txt: cannot read the image set"):
        fc.own_datasets("voc", root, quiet=True)


def test_exif_rotated_photo_is_read_as_stored(tmp_path):
    """A phone photo whose EXIF says "rotate 90°": its boxes (COCO, VOC) refer to the pixels as
    stored, so load_image keeps them as stored (48 x 64), not turned (64 x 48)."""
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:10, :20] = 255                                   # a white corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                         # Orientation: rotate 90° clockwise to view
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "photo.jpg") as im:
        assert im.getexif()[0x0112] == 6
    image = fc.load_image(tmp_path / "photo.jpg")
    assert image.shape == (3, 48, 64)
    assert image[:, :10, :20].mean() > 0.9 and image[:, 20:, 30:].mean() < 0.1
