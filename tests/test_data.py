"""Section 01: the embedded dataset, the COCO and VOC readers, images, flip and batching.

Every test writes its own files under tmp_path; expected values are worked out by hand.
"""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import frcnn_common as fc


# ---- helpers ---------------------------------------------------------------------------------

def write_png(path, width, height, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)
    return path


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def coco_file(tmp_path, annotations, images=None, categories=None):
    images = images if images is not None else [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}]
    categories = categories if categories is not None else [{"id": 1, "name": "cat"}]
    for img in images:
        write_png(tmp_path / "img" / img["file_name"], img["width"], img["height"])
    return write_json(tmp_path / "ann.json", {"images": images, "annotations": annotations,
                                              "categories": categories})


def voc_xml(filename="000001.jpg", width=60, height=40, objects=(), size=True):
    """objects: (name, difficult, xmin, ymin, xmax, ymax) in VOC's 1-based inclusive pixels."""
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
        f"<xmax>{c}</xmax><ymax>{e}</ymax></bndbox></object>" for n, d, a, b, c, e in objects)
    size_xml = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><folder>VOC</folder><filename>{filename}</filename>{size_xml}{objs}</annotation>"


def voc_root(tmp_path, xmls):
    """xmls: {stem: (xml text, image width, image height)}."""
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    for stem, (text, width, height) in xmls.items():
        (root / "Annotations" / f"{stem}.xml").write_text(text)
        write_png(root / "JPEGImages" / f"{stem}.jpg", width, height)   # PNG bytes; PIL reads by content
    return root


# ---- the embedded dataset --------------------------------------------------------------------

def test_shapes_build_is_deterministic(tmp_path):
    a = fc.build_shapes_dataset(tmp_path / "a", seed=3, num_train=12, num_val=4)
    b = fc.build_shapes_dataset(tmp_path / "b", seed=3, num_train=12, num_val=4)
    c = fc.build_shapes_dataset(tmp_path / "c", seed=4, num_train=12, num_val=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) == 16
    assert {"annotations/instances_train.json", "annotations/instances_val.json"} <= {str(f) for f in files}
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "train/000001.png").read_bytes() != (c / "train/000001.png").read_bytes()


def test_shapes_build_is_idempotent(tmp_path, capsys):
    root = fc.build_shapes_dataset(tmp_path / "s", num_train=6, num_val=2)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert fc.build_shapes_dataset(tmp_path / "s", num_train=6, num_val=2) == root
    assert "reusing" in capsys.readouterr().out
    assert fc.build_shapes_dataset(tmp_path / "s", num_train=6, num_val=2, quiet=True) == root
    assert capsys.readouterr().out == ""          # what a second DDP rank calls
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps

    # A smaller build replaces the larger one and leaves no stale image behind.
    fc.build_shapes_dataset(tmp_path / "s", num_train=4, num_val=2)
    assert sorted(p.name for p in (root / "train").glob("*.png")) == [f"{i:06d}.png" for i in range(1, 5)]
    # An interrupted build (no manifest) or a missing image is not reused.
    (root / "manifest.json").unlink()
    capsys.readouterr()
    fc.build_shapes_dataset(tmp_path / "s", num_train=4, num_val=2)
    assert "wrote" in capsys.readouterr().out
    (root / "val/000002.png").unlink()
    fc.build_shapes_dataset(tmp_path / "s", num_train=4, num_val=2)
    assert (root / "val/000002.png").exists()


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return fc.build_shapes_dataset(tmp_path_factory.mktemp("shapes"), seed=0, num_train=150, num_val=10)


def test_shapes_content(shapes_root):
    data = json.loads((shapes_root / "annotations/instances_train.json").read_text())
    assert len(fc.SHAPES_CLASSES) - 1 >= 5 and fc.SHAPES_CLASSES[0] == "__background__"
    assert [c["id"] for c in data["categories"]] == list(range(1, len(fc.SHAPES_CLASSES)))
    assert [c["name"] for c in data["categories"]] == list(fc.SHAPES_CLASSES[1:])
    assert {a["category_id"] for a in data["annotations"]} == set(range(1, len(fc.SHAPES_CLASSES)))

    size = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    for img in data["images"]:
        assert 160 <= img["width"] <= 320 and 160 <= img["height"] <= 320
        with Image.open(shapes_root / "train" / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=len(size) + 1)[1:]
    assert per_image.max() <= 10 and (per_image == 0).sum() >= 2      # some empty images
    assert len(set(per_image.tolist())) >= 8                           # and every count between

    small, large = [], []
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        W, H = size[a["image_id"]]
        assert all(isinstance(v, int) for v in a["bbox"]) and w >= 1 and h >= 1
        assert 0 <= x and x + w <= W and 0 <= y and y + h <= H
        assert a["area"] == w * h and a["iscrowd"] == 0
        small.append(min(w, h))
        large.append(max(w, h) / min(W, H))
    assert min(small) <= 12                       # objects from about 8 px ...
    assert max(large) >= 0.6                      # ... to most of the image
    aspect = [a["bbox"][2] / a["bbox"][3] for a in data["annotations"]]
    assert min(aspect) < 0.6 and max(aspect) > 1.6


def test_shapes_visible_share_is_what_later_shapes_leave():
    """visible = the shape's pixels left uncovered / the pixels it drew: the last shape drawn is
    whole, and a shape partly hidden has a later shape's pixels inside its box."""
    for i in range(10):
        rng = np.random.default_rng([0, 0, i])
        pixels, annotations, owner = fc._draw_shapes_image(rng, fc.SHAPES_CLASSES)
        if not annotations:
            continue
        assert annotations[-1][2] == 1.0                                   # nothing drawn over the last
        for j, (_, _, visible) in enumerate(annotations):
            covered_by_later = visible < 1.0
            # a shape partly hidden has a later shape whose box overlaps its own
            if covered_by_later:
                x, y, w, h = annotations[j][1]
                later = owner[y:y + h, x:x + w]
                assert (later > j).any()


def test_shapes_boxes_are_tight():
    # Each box is the extent of the pixels its shape still shows: the first and last row and
    # column inside the box hold some of them, and nothing of the shape lies outside the box.
    for i in range(20):
        pixels, annotations, owner = fc._draw_shapes_image(np.random.default_rng([0, 0, i]), fc.SHAPES_CLASSES)
        assert owner.shape == pixels.shape[:2] and owner.max() == len(annotations) - 1
        for j, (label, (x, y, w, h), visible) in enumerate(annotations):
            mask = owner == j
            assert mask[y:y + h, x:x + w].sum() == mask.sum()             # nothing outside
            assert fc._SHAPES_MIN_VISIBLE <= visible <= 1
            inside = mask[y:y + h, x:x + w]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_shapes_read_back_through_coco_reader(shapes_root):
    ds = fc.CocoDetection(shapes_root / "val", shapes_root / "annotations/instances_val.json")
    assert ds.class_names == fc.SHAPES_CLASSES and len(ds) == 10
    data = json.loads((shapes_root / "annotations/instances_val.json").read_text())
    x, y, w, h = data["annotations"][0]["bbox"]
    image, target = ds[ds.image_ids.index(data["annotations"][0]["image_id"])]
    assert image.dtype == torch.float32 and image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
    assert [x, y, x + w, y + h] in target["boxes"].tolist()


# ---- images ----------------------------------------------------------------------------------

def test_load_image_modes(tmp_path):
    rgb = np.array([[[10, 20, 30], [200, 100, 0]]], np.uint8)              # (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.array([[0, 100, 255]], np.uint8)).save(tmp_path / "gray.png")
    rgba = np.concatenate([rgb, np.array([[[0], [128]]], np.uint8)], 2)     # alpha 0 and 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pal = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * 759)
    pal.save(tmp_path / "pal.png")
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(tmp_path / "gray16.png")

    def read(name):
        image = fc.load_image(tmp_path / name)
        assert image.dtype == torch.float32 and image.shape[0] == 3 and image.is_contiguous()
        return (image * 255).permute(1, 2, 0)                              # (H, W, 3) in 0..255

    torch.testing.assert_close(read("rgb.png"), torch.tensor(rgb, dtype=torch.float32))
    torch.testing.assert_close(read("gray.png"), torch.tensor([[[0.0] * 3, [100.0] * 3, [255.0] * 3]]))
    torch.testing.assert_close(read("rgba.png"), torch.tensor(rgb, dtype=torch.float32))   # alpha dropped
    torch.testing.assert_close(read("pal.png"), torch.tensor([[[255.0, 0, 0], [0, 255, 0], [10, 20, 30]]]))
    # 16-bit: scaled by 65535, not clipped at 255
    sixteen = fc.load_image(tmp_path / "gray16.png")
    torch.testing.assert_close(sixteen[:, 0], torch.tensor([0.0, 32768 / 65535, 1.0]).expand(3, 3))


def test_load_image_missing_or_broken(tmp_path):
    with pytest.raises(fc.DatasetError, match="nothere.png.*not found"):
        fc.load_image(tmp_path / "nothere.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(fc.DatasetError, match="broken.png.*cannot read"):
        fc.load_image(tmp_path / "broken.png")


# ---- COCO ------------------------------------------------------------------------------------

def test_coco_boxes_labels_crowd_and_empty_images(tmp_path):
    images = [{"id": 7, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 3, "file_name": "b.png", "width": 20, "height": 20}]          # no boxes
    categories = [{"id": 90, "name": "zebra"}, {"id": 1, "name": "person"}, {"id": 5, "name": "plane"}]
    anns = [{"id": 11, "image_id": 7, "category_id": 90, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 12, "image_id": 7, "category_id": 5, "bbox": [0.5, 1.5, 2.25, 3], "iscrowd": 1},
            {"id": 13, "image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4]}]             # no iscrowd: 0
    ds = fc.CocoDetection(tmp_path / "img", coco_file(tmp_path, anns, images, categories))

    assert ds.class_names == ("__background__", "person", "plane", "zebra")
    assert ds.cat_id_to_label == {1: 1, 5: 2, 90: 3} and ds.label_to_cat_id == {1: 1, 2: 5, 3: 90}
    assert ds.image_ids == [3, 7] and len(ds) == 2

    image, target = ds[1]
    assert image.shape == (3, 30, 40) and target["image_id"] == 7
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[10, 5, 30, 15], [0.5, 1.5, 2.75, 4.5], [1, 2, 4, 6]]
    assert target["labels"].tolist() == [3, 2, 1] and target["labels"].dtype == torch.int64
    assert target["iscrowd"].tolist() == [False, True, False]

    for i in range(len(ds)):                                                       # without the image
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(ds[i][1][k])) for k, v in ds.target(i).items())

    image, target = ds[0]                                                          # image id 3
    assert image.shape == (3, 20, 20) and target["image_id"] == 3
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["iscrowd"].shape == (0,) and target["iscrowd"].dtype == torch.bool


def test_coco_category_id_zero_is_just_another_id(tmp_path):
    anns = [{"id": 1, "image_id": 7, "category_id": 0, "bbox": [1, 1, 5, 5]}]
    ds = fc.CocoDetection(tmp_path / "img", coco_file(tmp_path, anns, categories=[{"id": 0, "name": "zero"}]))
    assert ds.class_names == ("__background__", "zero") and ds[0][1]["labels"].tolist() == [1]


def test_coco_bad_boxes_clipped_or_dropped_with_one_warning(tmp_path):
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [5, 5, 10, 10]},     # fine
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [35, 25, 10, 10]},   # over the corner
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [-4, 2, 6, 3]},      # left of the image
            {"id": 4, "image_id": 7, "category_id": 1, "bbox": [5, 5, 0, 10]},      # zero width
            {"id": 5, "image_id": 7, "category_id": 1, "bbox": [10, 10, -5, 5]},    # negative width
            {"id": 6, "image_id": 7, "category_id": 1, "bbox": [50, 0, 5, 5]}]      # wholly outside
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = fc.CocoDetection(tmp_path / "img", coco_file(tmp_path, anns))
    caught = [w for w in caught if issubclass(w.category, fc.DatasetWarning)]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "ann.json" in message
    assert "2 boxes partly outside the image were clipped to it (annotations 2, 3)" in message
    assert "3 boxes with no area inside the image were dropped (annotations 4, 5, 6)" in message
    assert ds.clipped_ann_ids == [2, 3] and ds.dropped_ann_ids == [4, 5, 6]
    assert ds[0][1]["boxes"].tolist() == [[5, 5, 15, 15], [35, 25, 40, 30], [0, 2, 2, 5]]


def test_coco_area_is_kept_and_follows_the_transforms(tmp_path):
    """The annotation's own area (a segmentation's, smaller than its box) reaches the target; an
    annotation without one gets its box's w * h; a clipped box keeps its object's area; the flip
    keeps it, the model's resize scales it, and training drops it with the crowd regions."""
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 61.5},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [30, 20, 20, 20], "area": 250.0},  # clipped
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 1}]       # no area
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fc.DatasetWarning)
        ds = fc.CocoDetection(tmp_path / "img", coco_file(tmp_path, anns))
    target = ds[0][1]
    assert target["area"].dtype == torch.float32 and target["area"].tolist() == [61.5, 250.0, 12.0]
    assert target["boxes"][1].tolist() == [30, 20, 40, 30]            # clipped; the area is not

    image, flipped = fc.RandomHorizontalFlip(p=1.0)(ds[0][0], target)
    assert torch.equal(flipped["area"], target["area"])
    transform = fc.DetectionTransform(min_size=60, max_size=1000)    # 40x30 -> 80x60: areas x4
    _, _, (resized,) = transform([image], [flipped])
    assert resized["area"].tolist() == [246.0, 1000.0, 48.0] and flipped["area"].tolist()[0] == 61.5
    (trains,) = fc.trainable_targets([target])
    assert set(trains) == {"boxes", "labels"} and len(trains["boxes"]) == 2

    no_area = [{k: v for k, v in a.items() if k != "area"} for a in anns]    # a file without areas
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fc.DatasetWarning)
        assert "area" not in fc.CocoDetection(tmp_path / "img", coco_file(tmp_path, no_area)).target(0)
    with pytest.raises(fc.DatasetError, match="annotation 1.*'area' must be a finite number"):
        fc.CocoDetection(tmp_path / "img", coco_file(tmp_path, [{**anns[0], "area": "big"}]))


def test_coco_clean_file_gives_no_warning(tmp_path):
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 40, 30]}]    # the whole image
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fc.CocoDetection(tmp_path / "img", coco_file(tmp_path, anns))


def test_coco_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(fc.DatasetError, match="bad.json.*not valid JSON"):
        fc.CocoDetection(tmp_path, bad)
    with pytest.raises(fc.DatasetError, match="missing.json.*not found"):
        fc.CocoDetection(tmp_path, tmp_path / "missing.json")
    write_json(bad, {"images": [], "annotations": []})
    with pytest.raises(fc.DatasetError, match="bad.json: key 'categories' is missing"):
        fc.CocoDetection(tmp_path, bad)
    for bbox in ([1, 2, 3], [1, 2, "3", 4], None, [1, 2, float("nan"), 4]):
        ann = coco_file(tmp_path, [{"id": 42, "image_id": 7, "category_id": 1, "bbox": bbox}])
        with pytest.raises(fc.DatasetError, match=r"ann.json: annotation 42 .*'bbox' must be 4 finite numbers"):
            fc.CocoDetection(tmp_path / "img", ann)
    ann = coco_file(tmp_path, [{"id": 42, "image_id": 7, "bbox": [1, 2, 3, 4]}])
    with pytest.raises(fc.DatasetError, match="ann.json: annotation 42 .*needs 'image_id', 'category_id'"):
        fc.CocoDetection(tmp_path / "img", ann)
    ann = write_json(tmp_path / "ann.json", {"images": [{"id": 1, "file_name": "a.png", "width": 10}],
                                             "annotations": [], "categories": []})
    with pytest.raises(fc.DatasetError, match=r"ann.json: images\[0\] needs 'id', 'file_name', 'width'"):
        fc.CocoDetection(tmp_path / "img", ann)
    twice = [{"id": 4, "file_name": "a.png", "width": 40, "height": 30}] * 2
    with pytest.raises(fc.DatasetError, match="ann.json: image id 4 appears twice"):
        fc.CocoDetection(tmp_path / "img", coco_file(tmp_path, [], images=twice))


def test_coco_unknown_category_or_image_id(tmp_path):
    ann = coco_file(tmp_path, [{"id": 8, "image_id": 7, "category_id": 42, "bbox": [1, 2, 3, 4]}])
    with pytest.raises(fc.DatasetError, match=r"ann.json: annotation 8 .*category_id 42.*not in 'categories' \(ids \[1\]\)"):
        fc.CocoDetection(tmp_path / "img", ann)
    ann = coco_file(tmp_path, [{"id": 8, "image_id": 99, "category_id": 1, "bbox": [1, 2, 3, 4]}])
    with pytest.raises(fc.DatasetError, match="annotation 8 .*image_id 99.*not in 'images'"):
        fc.CocoDetection(tmp_path / "img", ann)


def test_coco_missing_or_wrong_size_image(tmp_path):
    ann = coco_file(tmp_path, [])
    (tmp_path / "img" / "a.png").unlink()
    ds = fc.CocoDetection(tmp_path / "img", ann)                  # images are read when used
    with pytest.raises(fc.DatasetError, match=r"img[/\\]a.png: image file not found"):
        ds[0]
    write_png(tmp_path / "img" / "a.png", 41, 30)
    with pytest.raises(fc.DatasetError, match="a.png: image is 41x30 pixels, but .*ann.json says 40x30"):
        ds[0]


# ---- Pascal VOC ------------------------------------------------------------------------------

def test_voc_reader(tmp_path):
    root = voc_root(tmp_path, {
        "000002": (voc_xml("000002.jpg", 60, 40, [("dog", 0, 1, 1, 60, 40), ("person", 1, 11, 6, 20, 15)]), 60, 40),
        "000001": (voc_xml("000001.jpg", 30, 20, []), 30, 20)})
    ds = fc.VOCDetection(root, ["dog", "person"])                 # "__background__" is put in front
    assert ds.class_names == ("__background__", "dog", "person") and len(ds) == 2
    image, target = ds[1]                                         # sorted: 000001, 000002
    assert image.shape == (3, 40, 60) and target["image_id"] == 1
    # 1-based inclusive -> 0-based, x2 exclusive: the whole image is [0, 0, 60, 40]
    assert target["boxes"].tolist() == [[0, 0, 60, 40], [10, 5, 20, 15]]
    assert target["labels"].tolist() == [1, 2]
    assert target["iscrowd"].tolist() == [False, True]            # difficult
    assert ds[0][1]["boxes"].shape == (0, 4)
    assert torch.equal(ds.target(1)["boxes"], target["boxes"])

    assert fc.VOCDetection(root).class_names == fc.VOC_CLASSES    # the 20 Pascal VOC classes
    assert fc.VOCDetection(root)[1][1]["labels"].tolist() == [12, 15]
    assert fc.VOCDetection(root, ["__background__", "person", "dog"])[1][1]["labels"].tolist() == [2, 1]
    with pytest.raises(fc.DatasetError, match="reserved for label 0"):
        fc.VOCDetection(root, ["dog", "__background__"])

    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "val.txt").write_text("000002\n")
    assert len(fc.VOCDetection(root, ["dog", "person"], image_set="val")) == 1
    with pytest.raises(fc.DatasetError, match="train.txt: cannot read the image set"):
        fc.VOCDetection(root, image_set="train")


def test_voc_bad_input(tmp_path):
    root = voc_root(tmp_path, {"a": (voc_xml("a.jpg", 60, 40, [("cat", 0, 1, 1, 10, 10)]), 60, 40)})
    with pytest.raises(fc.DatasetError, match=r"a.xml: object 0 has class name 'cat', which is not in class_names"):
        fc.VOCDetection(root, ["dog"])
    (root / "Annotations" / "a.xml").write_text("<annotation><filename>a.jpg</filename><object>")
    with pytest.raises(fc.DatasetError, match="a.xml: malformed XML"):
        fc.VOCDetection(root, ["dog"])
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><object><name>dog</name></object></annotation>")
    with pytest.raises(fc.DatasetError, match=r"a.xml: object 0 \(dog\) has no <bndbox>"):
        fc.VOCDetection(root, ["dog"])
    (root / "Annotations" / "a.xml").write_text(voc_xml("a.jpg", objects=[("__background__", 0, 1, 1, 5, 5)]))
    with pytest.raises(fc.DatasetError, match="reserved for background"):
        fc.VOCDetection(root, ["dog"])


def test_voc_clipping_and_missing_size(tmp_path):
    # No <size>: read from the image. A box past the right edge is clipped, with one warning.
    root = voc_root(tmp_path, {"a": (voc_xml("a.jpg", objects=[("dog", 0, 51, 11, 80, 20)], size=False), 60, 40)})
    with pytest.warns(fc.DatasetWarning, match="1 boxes partly outside the image were clipped"):
        ds = fc.VOCDetection(root, ["dog"])
    assert ds[0][1]["boxes"].tolist() == [[50, 10, 60, 20]]


# ---- transforms and batching -----------------------------------------------------------------

def test_flip_is_exact_and_an_involution():
    image = torch.zeros(3, 20, 40)
    image[:, 5:15, 2:12] = 1.0                                    # an object at x 2..12, y 5..15
    target = {"boxes": torch.tensor([[2.0, 5.0, 12.0, 15.0], [0.0, 0.0, 40.0, 20.0]]),
              "labels": torch.tensor([1, 2]), "image_id": 0, "iscrowd": torch.tensor([False, False])}
    flip = fc.RandomHorizontalFlip(p=1.0)
    flipped, flipped_target = flip(image, target)
    assert flipped_target["boxes"].tolist() == [[28, 5, 38, 15], [0, 0, 40, 20]]
    cols = flipped[0].amax(0).nonzero().flatten()                 # the object's columns after the flip
    assert (cols.min().item(), cols.max().item() + 1) == (28, 38)
    assert torch.equal(flipped_target["labels"], target["labels"])
    again, again_target = flip(flipped, flipped_target)
    assert torch.equal(again, image) and torch.equal(again_target["boxes"], target["boxes"])
    assert target["boxes"][0].tolist() == [2, 5, 12, 15]          # the input is not changed

    same, same_target = fc.RandomHorizontalFlip(p=0.0)(image, target)
    assert same is image and same_target is target
    empty = {**target, "boxes": torch.zeros(0, 4)}
    assert flip(image, empty)[1]["boxes"].shape == (0, 4)

    torch.manual_seed(0)
    half = fc.RandomHorizontalFlip()
    flips = sum(half(image, target)[1]["boxes"][0, 0].item() == 28 for _ in range(400))
    assert 160 < flips < 240


def test_compose_runs_in_order():
    calls = []

    def step(name):
        def t(image, target):
            calls.append(name)
            return image + 1, target
        return t

    image, target = fc.Compose([step("a"), step("b")])(torch.zeros(1), {})
    assert calls == ["a", "b"] and image.item() == 2


def test_collate_and_loader(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 20 + i, "height": 10 + i} for i in range(1, 6)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5]} for i in range(1, 6)]
    ds = fc.CocoDetection(tmp_path / "img", coco_file(tmp_path, anns, images))

    images_batch, targets_batch = fc.collate_fn([ds[0], ds[1]])
    assert isinstance(images_batch, list) and isinstance(targets_batch, list)
    assert [im.shape for im in images_batch] == [(3, 11, 21), (3, 12, 22)]
    assert [t["image_id"] for t in targets_batch] == [1, 2]

    def order(loader):
        return [t["image_id"] for _, targets in loader for t in targets]

    loader = fc.make_data_loader(ds, batch_size=2, shuffle=True, seed=1)
    assert loader.num_workers == 0                                # a tiny set: no worker processes
    epochs = [order(loader) for _ in range(3)]
    assert all(sorted(e) == [1, 2, 3, 4, 5] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1                    # a new order every epoch ...
    again = fc.make_data_loader(ds, batch_size=2, shuffle=True, seed=1)
    assert [order(again) for _ in range(3)] == epochs             # ... the same ones every run
    assert [len(images) for images, _ in loader] == [2, 2, 1]
    assert order(fc.make_data_loader(ds, batch_size=2, shuffle=False)) == [1, 2, 3, 4, 5]
    assert len(fc.make_data_loader(ds, batch_size=2, shuffle=True, drop_last=True)) == 2

    # Worker processes read the same images; the first epoch's order is the same as without them
    # (persistent workers draw their seeds once, so later epochs differ, but are reproducible too).
    workers = [fc.make_data_loader(ds, batch_size=2, shuffle=True, seed=1, num_workers=2) for _ in range(2)]
    assert workers[0].persistent_workers
    runs = [[order(w) for _ in range(3)] for w in workers]
    assert runs[0][0] == epochs[0] and runs[0] == runs[1]
