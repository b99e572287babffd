"""Faster R-CNN from scratch: the code that the notebooks explain.

One section per notebook, in notebook order, then the appendix and the command line; each
opens with a banner (these lines, word for word) and an index of the names it defines:

    01 data: embedded dataset, COCO / VOC readers, your own data and check-data, transforms, batching
    02 backbone: Bottleneck, ResNet50, FPN
    03 rpn: boxes, anchors, box coding, matching, sampling, NMS, the Region Proposal Network
    04 roi heads: RoIAlign, level mapping, box head, predictor, RoI sampling and loss, FasterRCNN
    05 training: profiles, the model they build, the training loop, checkpoints, DDP
    06 evaluation: the COCO detection metric, through pycocotools and from scratch
    08 diagnosis: error types (TIDE), the object funnel, the training dashboard
    Appendix: speed and parity
    09 deployment: one ONNX file, pixels in, detections out; onnxruntime; predict --onnx
    Prediction, drawing and the CLI: python -m frcnn_common data | train | evaluate | predict | check-data | errors | export

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

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import pathlib
import random
import re
import signal
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.data
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch import Tensor, nn
from tqdm import tqdm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = pathlib.Path(__file__).resolve().parent

# ImageNet statistics: every torchvision backbone was trained on images normalised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# =============================================================================================
# 01 data: embedded dataset, COCO / VOC readers, your own data and check-data, transforms, batching
# =============================================================================================
# SHAPES_CLASSES, build_shapes_dataset — the embedded dataset, written in COCO format
# load_image — any PNG/JPEG mode -> FloatTensor[3, H, W]; write_atomic — temporary file, then rename
# DetectionFiles — the readers' base: clip, warn, group by image, ds[i] -> (image, target)
# CocoDetection, VOCDetection — readers of COCO json / Pascal VOC xml; class_names[0] == "__background__"
# DatasetError, DatasetWarning — bad input: an error naming the file, or one warning per dataset
# RandomHorizontalFlip, Compose — transforms of (image, target) pairs
# collate_fn, make_data_loader — batches are lists: images differ in size
# coco_files, voc_xml_files, voc_class_names — your own folder, as annotation tools write it (notebook 07)
# split_ids, own_datasets — a seeded train/val split when the folder has none; both datasets
# best_anchor_iou, check_data, DataReport — problems with their files; the anchors' best possible recall
# check_before_training, DataCheckFailed — what train runs first, and what it raises on errors
# GLYPH_CLASSES, draw_glyphs_image, write_voc_folder, write_coco_folder, build_glyphs_dataset — notebook 07's letters
"""Section 01. Everything a detector eats, in one format.

    image   FloatTensor[3, H, W], RGB, values in 0..1 (H, W differ between images)
    target  {"boxes":    FloatTensor[N, 4]  xyxy, absolute pixels, 0-based, x2/y2 exclusive,
             "labels":   Int64Tensor[N]     contiguous class labels 1..K (0 is background),
             "image_id": int,
             "iscrowd":  BoolTensor[N]      COCO crowd regions and VOC 'difficult' objects:
                                            training drops them, evaluation ignores them,
             "area":     FloatTensor[N]     only when the COCO file gives it: the object's area
                                            (COCO 2017: its segmentation's), which sorts it into
                                            small / medium / large for APs/APm/APl; without it,
                                            evaluation uses the box's area}

A box [x1, y1, x2, y2] covers the pixels with x1 <= col < x2 and y1 <= row < y2, so an object
that fills a W-pixel-wide image has x1 = 0 and x2 = W, and its width is x2 - x1.

Resizing and padding to a multiple of 32 happen inside the model (FasterRCNN), so that the
model works on images of any size and reports boxes in the input image's pixels.
"""


class DatasetError(ValueError):
    """A file the data pipeline cannot use; the message names the file and what is wrong."""


class DatasetWarning(UserWarning):
    """Input the readers repaired (boxes clipped to the image or dropped); one per dataset."""


# ---- the embedded "shapes" dataset -----------------------------------------------------------

SHAPES_CLASSES = ("__background__", "circle", "square", "triangle", "star", "ellipse", "cross")

# Bump _SHAPES_VERSION whenever the drawing code changes, so that old builds are redrawn.
_SHAPES_VERSION = 4
_SHAPES_SIDE = (160, 320)        # image width and height are drawn from this range (px)
_SHAPES_MIN_OBJECT = 8           # smallest object, longer side in px
_SHAPES_MAX_OBJECTS = 10
_SHAPES_EMPTY_FRACTION = 0.05    # images with no objects at all: negatives the model must learn
_SHAPES_MIN_VISIBLE = 0.5        # an object stays at least this visible, or it is not drawn


def _shape_outline(name, rng):
    """Unit outline of one shape: Float[V, 2] (x, y), unrotated bounding box's longer side 1."""
    if name in ("circle", "ellipse"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif name == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    elif name == "triangle":
        t = np.radians([-90, 30, 150])
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif name == "star":
        t = np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif name == "cross":
        a = rng.uniform(0.3, 0.45)   # arm half-thickness, relative to the half-size 1
        pts = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                        [-a, a], [-1, a], [-1, -a], [-a, -a]])
    else:
        raise ValueError(f"unknown shape {name!r}")
    # Aspect ratio (width / height of the unrotated shape) and rotation, per class: circles and
    # squares keep their aspect, ellipses never look like circles, the rest stretch a little.
    aspect = {"circle": 1.0, "square": 1.0,
              "ellipse": math.exp(rng.uniform(math.log(1.7), math.log(3.2))),
              "triangle": math.exp(rng.uniform(-0.5, 0.5)),
              "star": math.exp(rng.uniform(-0.25, 0.25)),
              "cross": math.exp(rng.uniform(-0.5, 0.5))}[name]
    rotation = {"circle": 0.0, "square": rng.uniform(-30, 30), "triangle": rng.uniform(0, 360),
                "star": rng.uniform(0, 72), "ellipse": rng.uniform(0, 180),
                "cross": rng.uniform(-20, 20)}[name]
    pts = pts * [aspect, 1.0]
    pts = (pts - (pts.min(0) + pts.max(0)) / 2) / np.ptp(pts, 0).max()
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return pts @ np.array([[c, s], [-s, c]])


def _shapes_background(rng, height, width):
    """One background: Float[H, W, 3] in 0..255 (flat, gradient, stripes, checker or clouds)."""
    c1 = rng.uniform(0, 255, 3)
    c2 = np.clip(c1 + rng.normal(0, 60, 3), 0, 255)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)         # (H, W) distance along a direction
    kind = rng.integers(5)
    if kind == 0:                                               # flat
        t = np.zeros((height, width), np.float32)
    elif kind == 1:                                             # linear gradient
        t = (along - along.min()) / max(np.ptp(along), 1.0)
    elif kind == 2:                                             # stripes, soft or hard
        t = 0.5 + 0.5 * np.sin(2 * np.pi * along / rng.uniform(6, 40))
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
    elif kind == 3:                                             # checkerboard
        cell = rng.integers(8, 33)
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    else:                                                       # smooth colour clouds
        grid = rng.integers(3, 11, size=2)
        low = np.clip(c1 + rng.normal(0, 50, (grid[0], grid[1], 3)), 0, 255).astype(np.uint8)
        big = Image.fromarray(low).resize((width, height), Image.BILINEAR)
        return np.asarray(big, dtype=np.float32)
    return c1 + t[..., None] * (c2 - c1)                        # (H, W, 1) * (3,) -> (H, W, 3)


def _draw_shapes_image(rng, class_names):
    """Draw one image: (uint8[H, W, 3], [(label, [x, y, w, h], visible), ...], owner Int32[H, W]).

    owner holds, per pixel, the index of the annotation drawn there (-1: background).

    Shapes are drawn one over another, mostly large ones first. A shape whose position would
    leave an earlier shape less than _SHAPES_MIN_VISIBLE visible is moved (or left out), so
    every shape in the image is annotated and every annotation is learnable. Each box is
    computed from the pixels of the shape that stay visible, so it is tight to the last pixel;
    visible is the share of the shape's pixels that later shapes leave uncovered (0.5..1).
    """
    height, width = (int(v) for v in rng.integers(_SHAPES_SIDE[0], _SHAPES_SIDE[1] + 1, 2))
    image = _shapes_background(rng, height, width)
    owner = np.full((height, width), -1, np.int32)              # (H, W) which object owns a pixel
    empty = rng.random() < _SHAPES_EMPTY_FRACTION
    num_objects = 0 if empty else int(rng.integers(1, _SHAPES_MAX_OBJECTS + 1))
    # Sizes are log-uniform (as many objects of 8..16 px as of 64..128 px): each pyramid level
    # gets its share.
    max_size = 0.95 * min(height, width)
    sizes = np.exp(rng.uniform(math.log(_SHAPES_MIN_OBJECT), math.log(max_size), num_objects))
    sizes = sizes[np.argsort(-sizes * rng.uniform(0.5, 1.5, num_objects))]
    objects = []                    # [label, crop (x0, y0, x1, y1), pixels drawn, pixels visible]
    for size in sizes:
        label = int(rng.integers(1, len(class_names)))
        outline = _shape_outline(class_names[label], rng) * size
        extent = np.ptp(outline, 0)                             # rotation can grow the box
        outline *= min(1.0, 0.98 * min(width / extent[0], height / extent[1]))
        placed = False
        for _ in range(10):                                     # a few tries to place it
            offset = rng.uniform(-outline.min(0), [width, height] - outline.max(0))
            pts = outline + offset
            x0, y0 = (int(v) for v in np.floor(pts.min(0)))
            x1, y1 = (min(int(v) + 1, lim) for v, lim in zip(np.ceil(pts.max(0)), (width, height)))
            canvas = Image.new("L", (x1 - x0, y1 - y0))
            ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts - [x0, y0]], fill=1)
            mask = np.asarray(canvas, dtype=bool)               # (h, w) the pixels drawn
            if not mask.any():                                  # too thin to show a pixel
                break
            under = owner[y0:y1, x0:x1][mask]                   # owners of the pixels we cover
            hidden = np.bincount(under[under >= 0], minlength=len(objects))
            if all(o[3] - n >= _SHAPES_MIN_VISIBLE * o[2] for o, n in zip(objects, hidden)):
                placed = True
                break
        if not placed:
            continue                                            # leave it out
        for o, n in zip(objects, hidden):
            o[3] -= int(n)
        region = image[y0:y1, x0:x1]                            # (h, w, 3) view
        # A colour that stands out from what lies underneath, with a gentle shading across it.
        below = region[mask].mean(0)
        colours = rng.uniform(0, 255, (8, 3))
        distance = np.linalg.norm(colours - below, axis=1)
        colour = colours[np.argmax(distance > 90) if (distance > 90).any() else np.argmax(distance)]
        _, xx = np.mgrid[0:y1 - y0, 0:x1 - x0]
        ramp = (xx / (x1 - x0) - 0.5)[..., None] * rng.normal(0, 25, 3)     # (h, w, 3)
        region[mask] = np.clip(colour + ramp[mask], 0, 255)
        owner[y0:y1, x0:x1][mask] = len(objects)
        objects.append([label, (x0, y0, x1, y1), int(mask.sum()), int(mask.sum())])
    image += rng.normal(0, rng.uniform(0, 6), image.shape)     # sensor noise over everything
    annotations = []
    for index, (label, (x0, y0, x1, y1), drawn, visible) in enumerate(objects):
        rows, cols = np.nonzero(owner[y0:y1, x0:x1] == index)
        bx, by = x0 + int(cols.min()), y0 + int(rows.min())
        # x2 = last column + 1: boxes lie on pixel edges (see the section docstring)
        bw, bh = x0 + int(cols.max()) + 1 - bx, y0 + int(rows.max()) + 1 - by
        annotations.append((label, [bx, by, bw, bh], round(visible / drawn, 3)))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), annotations, owner


def write_atomic(path, write) -> None:
    """Create path through `write(temporary_path)`, then rename it into place. A rename is atomic:
    a kill mid-write leaves the previous file (or none), never half of a new one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json_atomic(path, obj, *, indent: int | None = None):
    """JSON through write_atomic: compact, unless indent is given (files meant to be read and diffed)."""
    text = json.dumps(obj, indent=indent) + "\n" if indent else json.dumps(obj, separators=(",", ":"))
    write_atomic(path, lambda tmp: tmp.write_text(text))


def build_shapes_dataset(root="data/shapes", *, seed=0, num_train=1000, num_val=200, force=False,
                         quiet=False):
    """Draw the embedded dataset and write it in COCO format; return root (pathlib.Path).

    root/train/000001.png ...   root/val/000001.png ...
    root/annotations/instances_train.json, instances_val.json   (COCO: bbox is [x, y, w, h])
    root/manifest.json          the settings of a complete build, written last

    Deterministic: the same seed and counts give the same bytes. Idempotent: a complete build
    with the same settings is reused (force=True redraws it); quiet=True says nothing when it is.
    """
    root = pathlib.Path(root)
    manifest = {"version": _SHAPES_VERSION, "seed": int(seed), "num_train": int(num_train),
                "num_val": int(num_val), "classes": list(SHAPES_CLASSES[1:])}
    manifest_file = root / "manifest.json"
    counts = {"train": num_train, "val": num_val}
    if not force and manifest_file.exists():
        try:
            same = json.loads(manifest_file.read_text()) == manifest
        except ValueError:
            same = False
        complete = same and all(
            (root / "annotations" / f"instances_{split}.json").exists()
            and all((root / split / f"{i:06d}.png").exists() for i in range(1, n + 1))
            for split, n in counts.items())
        if complete:
            if not quiet:
                print(f"shapes dataset: reusing {root} ({num_train} train + {num_val} val images, seed {seed})")
            return root
    manifest_file.unlink(missing_ok=True)                       # incomplete until written again
    start = time.perf_counter()
    categories = [{"id": k, "name": name, "supercategory": "shape"}
                  for k, name in enumerate(SHAPES_CLASSES) if k > 0]
    for split_index, (split, count) in enumerate(counts.items()):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        for stale in (root / split).glob("*.png"):              # left over from a larger build
            if stale.stem.isdigit() and int(stale.stem) > count:
                stale.unlink()
        images, annotations = [], []
        for image_id in tqdm(range(1, count + 1), desc=f"shapes {split}", unit="img"):
            # One generator per image: image i is the same whatever the counts.
            rng = np.random.default_rng([seed, split_index, image_id])
            pixels, objects, _ = _draw_shapes_image(rng, SHAPES_CLASSES)
            file_name = f"{image_id:06d}.png"
            # compress_level 1: three times faster than the default, files 15% larger.
            Image.fromarray(pixels).save(root / split / file_name, compress_level=1)
            images.append({"id": image_id, "file_name": file_name,
                           "width": pixels.shape[1], "height": pixels.shape[0]})
            for label, bbox, visible in objects:
                # No masks here, so "area" is the box area, as the evaluator computes it from boxes.
                # "visible" (not a COCO field; readers ignore it) is the share of the shape that
                # the shapes drawn over it leave uncovered: notebook 06 measures what occlusion costs.
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": label, "bbox": bbox,
                                    "area": bbox[2] * bbox[3], "iscrowd": 0, "visible": visible})
        _write_json_atomic(root / "annotations" / f"instances_{split}.json",
                           {"info": {"description": f"shapes dataset, seed {seed}"}, "licenses": [],
                            "images": images, "annotations": annotations, "categories": categories})
    _write_json_atomic(manifest_file, manifest)
    print(f"shapes dataset: wrote {root} ({num_train} train + {num_val} val images, seed {seed}) "
          f"in {time.perf_counter() - start:.1f} s")
    return root


# ---- images ----------------------------------------------------------------------------------

def load_image(path):
    """Read an image file as FloatTensor[3, H, W], RGB, values in 0..1.

    Grayscale is repeated over the three channels; palette images go through their palette;
    16-bit images (modes I;16 and I) are scaled by 65535, keeping their full range. An alpha
    channel is dropped (the stored colours are kept, as PIL's convert("RGB") does); boxes are
    drawn on what the pixels show, and compositing would invent a background. EXIF rotation is
    not applied: COCO and VOC boxes refer to the pixels as stored.
    """
    path = pathlib.Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                gray = np.clip(np.asarray(im, dtype=np.float32) / 65535, 0, 1)  # (H, W)
                return torch.from_numpy(np.repeat(gray[None], 3, 0))            # (3, H, W)
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA")                     # a palette may hold transparency
            pixels = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read the image ({e})") from None
    # (H, W, 3) uint8 -> (3, H, W) float in 0..1. In numpy: torch's thread pool would only add
    # overhead on an image this size, in a loader's main process.
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(np.divide(chw, 255, out=chw))


def _clip_boxes(boxes, widths, heights):
    """Clip xyxy boxes Float[A, 4] to their images; returns (boxes, changed[A], keep[A]).

    changed: a side moved by more than float rounding; keep: something is left (x2 > x1, y2 > y1).
    """
    limits = np.stack([widths, heights, widths, heights], 1)   # (A, 4)
    clipped = np.clip(boxes, 0, limits)
    changed = (np.abs(clipped - boxes) > 1e-3).any(1)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped.astype(np.float32), changed & keep, keep


def _warn_repaired(source, clipped_ids, dropped_ids):
    """The one warning a dataset gives about the boxes it repaired, naming them."""
    if not clipped_ids and not dropped_ids:
        return

    def some(ids):
        ids = [str(i) for i in ids]
        return ", ".join(ids[:20]) + (f", ... ({len(ids) - 20} more)" if len(ids) > 20 else "")

    parts = []
    if clipped_ids:
        parts.append(f"{len(clipped_ids)} boxes partly outside the image were clipped to it "
                     f"(annotations {some(clipped_ids)})")
    if dropped_ids:
        parts.append(f"{len(dropped_ids)} boxes with no area inside the image were dropped "
                     f"(annotations {some(dropped_ids)})")
    warnings.warn(f"{source}: " + "; ".join(parts), DatasetWarning, stacklevel=4)  # at the reader's caller


def _make_target(boxes, labels, iscrowd, image_id, area=None):
    # Copies, so that a transform that works in place cannot change the dataset.
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(labels, dtype=torch.int64),
              "image_id": int(image_id),
              "iscrowd": torch.tensor(iscrowd, dtype=torch.bool)}
    if area is not None:
        target["area"] = torch.tensor(area, dtype=torch.float32).reshape(-1)
    return target


def _check_size(path, image, width, height, source):
    if image.shape[1:] != (height, width):
        raise DatasetError(f"{path}: image is {image.shape[2]}x{image.shape[1]} pixels, but "
                           f"{source} says {width}x{height}")


# ---- the readers' shared base ------------------------------------------------------------------

class DetectionFiles(torch.utils.data.Dataset):
    """What the COCO and VOC readers share, once: image files with boxes in one list each.

    A reader parses its annotation format, then hands every box to _group_boxes:
        images            [{"file_name", "width", "height", "path", ...}, ...]  one dict an image
        box_image         Int[A]     the index in `images` of each box (A boxes in all)
        boxes             Float[A, 4] xyxy, 0-based pixel edges (the section's convention)
        labels, iscrowd   Int64[A], Bool[A]
        area              Float[A] or None: the annotations' own areas (COCO), kept as given
        box_ids           what a warning calls each box (a COCO annotation id, "a.xml/object 0")
        box_files         the annotation file that holds each box (for check-data's report)
    _group_boxes clips the boxes to their images, drops what has nothing left, warns once
    (naming them), and groups the survivors by image. Then, for every reader:
        ds[i] -> (FloatTensor[3, H, W], target)   target(i) without reading the image
        image_path(i), problems (what check_data reports: (kind, file, detail), see there)
    """
    kind = "DetectionFiles"

    def _group_boxes(self, source, box_image, boxes, labels, iscrowd, box_ids, box_files, area=None) -> None:
        box_image = np.asarray(box_image, np.int64).reshape(-1)
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        widths = np.array([self.images[i]["width"] for i in box_image], np.float64)
        heights = np.array([self.images[i]["height"] for i in box_image], np.float64)
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])   # before clipping
        boxes, changed, keep = _clip_boxes(boxes, widths, heights)
        self.clipped_ann_ids = [a for a, c in zip(box_ids, changed) if c]
        self.dropped_ann_ids = [a for a, k in zip(box_ids, keep) if not k]
        _warn_repaired(source, self.clipped_ann_ids, self.dropped_ann_ids)
        for k in np.flatnonzero(~keep | changed):
            kind = ("degenerate box" if degenerate[k] else
                    "box outside the image" if not keep[k] else "box partly outside the image")
            what = "dropped" if not keep[k] else "clipped"
            self.problems.append((kind, str(box_files[k]), f"{box_ids[k]}: {what}"))

        # Group the surviving boxes by image: per image Float[N, 4], Int64[N], Bool[N].
        labels, iscrowd = np.asarray(labels, np.int64), np.asarray(iscrowd, bool)
        order = np.argsort(box_image[keep], kind="stable")
        per_image = np.bincount(box_image[keep], minlength=len(self.images))
        splits = np.cumsum(per_image)[:-1]
        self._boxes = np.split(boxes[keep][order], splits)
        self._labels = np.split(labels[keep][order], splits)
        self._iscrowd = np.split(iscrowd[keep][order], splits)
        self._area = (None if area is None else  # a clipped box keeps its object's area, as COCO's
                      np.split(np.asarray(area, np.float64)[keep][order], splits))

    def __len__(self):
        return len(self.images)

    def image_path(self, index) -> pathlib.Path:
        return self.images[index]["path"]

    def target(self, index):
        """The target of image `index` without reading the image (no transforms applied)."""
        return _make_target(self._boxes[index], self._labels[index], self._iscrowd[index],
                            self.image_ids[index], None if self._area is None else self._area[index])

    def __getitem__(self, index):
        info = self.images[index]
        image = load_image(info["path"])
        _check_size(info["path"], image, info["width"], info["height"], info["source"])
        target = self.target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self):
        return f"{self.kind}({len(self)} images, {self.num_classes - 1} classes, {self.where})"


def _class_labels(class_names) -> dict:
    """{name: label} for class names given by the user; "__background__" is put in front when it
    is not already first, and may appear nowhere else (it is label 0)."""
    names = list(class_names)
    if not names or names[0] != "__background__":
        names.insert(0, "__background__")
    if "__background__" in names[1:]:
        raise DatasetError("class_names: '__background__' is reserved for label 0 and can only come first")
    if len(set(names)) != len(names):
        raise DatasetError(f"class_names has duplicates: {names}")
    return {name: label for label, name in enumerate(names)}


# ---- COCO ------------------------------------------------------------------------------------

class CocoDetection(DetectionFiles):
    """COCO 2017, or any set in COCO format (a folder of images and an instances_*.json), as
    CVAT, Label Studio and Roboflow export it.

    ds[i] -> (image FloatTensor[3, H, W], target dict); see the section docstring.
    COCO category ids (1..90 with gaps in COCO 2017, or anything, even 0) become contiguous
    labels 1..K in sorted id order, because the classifier has one output per label and
    label 0 is background:
        class_names      tuple, class_names[0] == "__background__", class_names[label]
        label_to_cat_id  {label: category id}      cat_id_to_label  {category id: label}
        image_ids        COCO image ids, ds[i] is image_ids[i] (sorted)
        images           [{"id", "file_name", "width", "height", "path"}, ...], in the same order
        target(i)        image i's target without reading the image (for counts and evaluation)
    image_ids=[...] reads only those images (one json for all, split by split_ids).
    The annotation file is checked when the dataset is built, not later in a loader worker:
    malformed JSON, missing keys, a bbox that is not 4 numbers or an unknown category or image id
    raise DatasetError naming the file (strict=False: unknown ids are skipped and listed in
    `problems` instead, for check_data). Boxes partly outside their image are clipped, boxes with
    nothing left are dropped, and one DatasetWarning names them. Crowd regions are kept with
    iscrowd True (training drops them, evaluation ignores detections on them); images without
    boxes are kept as negatives. When the annotations give an 'area', targets carry it (an
    annotation without one gets its bbox's w * h), and evaluation sorts objects into small,
    medium and large by it, as COCOeval does.
    """
    kind = "CocoDetection"

    def __init__(self, image_dir, ann_file, *, transforms=None, image_ids=None, strict=True):
        self.image_dir = pathlib.Path(image_dir)
        self.ann_file = pathlib.Path(ann_file)
        self.transforms = transforms
        self.where = f"images {self.image_dir}, annotations {self.ann_file}"
        self.problems = []
        data = _read_coco_json(self.ann_file)

        def bad(what):
            return DatasetError(f"{self.ann_file}: {what}")

        cat_ids = []
        names = {}
        for k, cat in enumerate(data["categories"]):
            if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
                raise bad(f"categories[{k}] needs an integer 'id' and a 'name', got {cat!r}")
            if cat["id"] in names:
                raise bad(f"category id {cat['id']} appears twice in 'categories'")
            cat_ids.append(cat["id"])
            names[cat["id"]] = str(cat["name"])
        cat_ids.sort()
        self.cat_id_to_label = {cat_id: label for label, cat_id in enumerate(cat_ids, start=1)}
        self.label_to_cat_id = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.class_names = ("__background__",) + tuple(names[c] for c in cat_ids)
        self.num_classes = len(self.class_names)                # including background

        self.images = []                                        # {"id", "file_name", "width", "height"}
        keys = ("id", "file_name", "width", "height")
        for k, img in enumerate(data["images"]):
            if not isinstance(img, dict) or any(key not in img for key in keys):
                raise bad(f"images[{k}] needs 'id', 'file_name', 'width' and 'height'; got {img!r}")
            size = (img["width"], img["height"])
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 for v in size):
                raise bad(f"image id {img['id']}: width and height must be positive numbers, got {size}")
            self.images.append({"id": img["id"], "file_name": img["file_name"],
                                "width": int(img["width"]), "height": int(img["height"]),
                                "path": self.image_dir / img["file_name"], "source": self.ann_file})
        self.images.sort(key=lambda img: img["id"])             # a stable order, whatever the file's
        ids = [img["id"] for img in self.images]
        if len(set(ids)) != len(ids):
            twice = next(i for i, j in zip(ids, ids[1:]) if i == j)
            raise bad(f"image id {twice} appears twice in 'images'")
        all_ids = set(ids)
        if image_ids is not None:                               # one split of a json for all
            wanted = set(image_ids)
            self.images = [img for img in self.images if img["id"] in wanted]
        position = {img["id"]: k for k, img in enumerate(self.images)}   # image id -> index
        self.image_ids = [img["id"] for img in self.images]

        anns = data["annotations"]
        ann_ids, image_index, labels, crowd, boxes, areas = [], [], [], [], [], []
        for k, ann in enumerate(anns):
            ann_id = ann.get("id", f"#{k}") if isinstance(ann, dict) else f"#{k}"
            name = f"annotation {ann_id} (annotations[{k}])"
            if not isinstance(ann, dict) or any(key not in ann for key in ("image_id", "category_id", "bbox")):
                raise bad(f"{name} needs 'image_id', 'category_id' and 'bbox'; got {ann!r}")
            bbox = ann["bbox"]
            numbers = isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
            if not numbers:
                raise bad(f"{name}: 'bbox' must be 4 finite numbers [x, y, width, height], got {bbox!r}")
            unknown = None
            if ann["category_id"] not in self.cat_id_to_label:
                unknown = ("unknown class", f"{name} has category_id {ann['category_id']!r}, which is not "
                           f"in 'categories' (ids {sorted(self.cat_id_to_label)})")
            elif ann["image_id"] not in all_ids:
                unknown = ("unknown image", f"{name} has image_id {ann['image_id']!r}, which is not in 'images'")
            area = ann.get("area")
            if area is not None and not (isinstance(area, (int, float)) and not isinstance(area, bool)
                                         and math.isfinite(area) and area >= 0):
                raise bad(f"{name}: 'area' must be a finite number >= 0, got {area!r}")
            if unknown and strict:
                raise bad(unknown[1])
            if unknown:
                self.problems.append((unknown[0], str(self.ann_file), unknown[1]))
                continue
            if ann["image_id"] not in position:                 # an image of the other split
                continue
            ann_ids.append(ann_id)
            image_index.append(position[ann["image_id"]])
            labels.append(self.cat_id_to_label[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)))
            x, y, w, h = bbox
            boxes.append([x, y, x + w, y + h])                  # xywh -> xyxy
            areas.append(area)
        has_area = any(a is not None for a in areas)            # COCO 2017: the segmentation's area
        areas = [a if a is not None else (x2 - x1) * (y2 - y1) for a, (x1, y1, x2, y2) in zip(areas, boxes)]
        self._group_boxes(self.ann_file, image_index, boxes, labels, crowd, ann_ids,
                          [self.ann_file] * len(ann_ids), areas if has_area else None)


def _read_coco_json(path):
    """Parse a COCO annotation file; the top level must hold images, annotations, categories."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO annotation file is a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problem = "is missing" if key not in data else "is not a list"
            raise DatasetError(f"{path}: key '{key}' {problem} (a COCO annotation file needs "
                               "'images', 'annotations' and 'categories')")
    return data


# ---- Pascal VOC ------------------------------------------------------------------------------

VOC_CLASSES = ("__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def voc_xml_files(root) -> list[pathlib.Path]:
    """The annotation files of a VOC folder, sorted: root/Annotations/*.xml, or, as LabelImg
    writes them beside the images, root/*.xml."""
    root = pathlib.Path(root)
    ann_dir = root / "Annotations" if (root / "Annotations").is_dir() else root
    xml_files = sorted(ann_dir.glob("*.xml"))
    if not xml_files:
        raise DatasetError(f"{ann_dir}: no .xml annotation files found")
    return xml_files


def voc_class_names(xml_files) -> tuple:
    """Class names found in VOC annotation files: VOC's 20, in their usual order, when every
    name is one of them (a real VOC2007/2012 folder); else the names found, sorted."""
    found = set()
    for xml_file in xml_files:
        found |= {name for name, _, _ in _parse_voc_xml(xml_file, None, size=False)[1]}
    if found <= set(VOC_CLASSES[1:]):
        return VOC_CLASSES
    return ("__background__",) + tuple(sorted(found))


class VOCDetection(DetectionFiles):
    """Pascal VOC, or any set in its format: root/Annotations/*.xml with the images in
    root/JPEGImages/, or beside the xml files (LabelImg's layout, also root/*.xml).

    Each xml names its image in <filename>. With image_set (e.g. "trainval"), only the ids
    listed in root/ImageSets/Main/{image_set}.txt are read; with ids (xml names without .xml),
    those; otherwise every xml, sorted.
    class_names gives the label order: labels are positions in it. "__background__" is put in
    front when it is not already first (so the 20 VOC names, or any list, work as they are);
    an object named "__background__" would collide with label 0, and is an error.
    class_names=None: the names in the annotations (voc_class_names: VOC's 20 for a real VOC set).
    'difficult' objects are kept with iscrowd True, so evaluation ignores them, as VOC's does.
    image_id is the index in the dataset; images[i] holds {"file_name", "width", "height", "xml",
    "path"}, and target(i) gives image i's target without reading the image. Errors name the xml
    file: malformed xml, missing fields, an object class that is not in class_names
    (strict=False: such objects are skipped and listed in `problems`, for check_data).
    """
    kind = "VOCDetection"

    def __init__(self, root, class_names=None, *, image_set=None, ids=None, transforms=None, strict=True):
        self.root = pathlib.Path(root)
        self.transforms = transforms
        self.where = f"root {self.root}"
        self.problems = []
        if image_set is not None:
            list_file = self.root / "ImageSets" / "Main" / f"{image_set}.txt"
            try:
                ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
            except OSError as e:
                raise DatasetError(f"{list_file}: cannot read the image set ({e.strerror})") from None
        xml_files = voc_xml_files(self.root)
        if ids is not None:
            xml_files = [xml_files[0].parent / f"{i}.xml" for i in ids]
        label_of = _class_labels(voc_class_names(xml_files) if class_names is None else class_names)
        self.class_names = tuple(label_of)
        self.num_classes = len(self.class_names)

        image_dir = self.root / "JPEGImages" if (self.root / "JPEGImages").is_dir() else None
        self.images = []                                        # {"file_name", "width", "height", ...}
        box_ids, box_files, box_image, boxes, labels, crowd = [], [], [], [], [], []
        for xml_file in xml_files:
            info, objects = _parse_voc_xml(xml_file, image_dir or xml_file.parent)
            for k, (name, difficult, box) in enumerate(objects):
                if name not in label_of or name == "__background__":
                    reason = ("is reserved for background (label 0)" if name == "__background__"
                              else f"is not in class_names {self.class_names[1:]}")
                    message = f"{xml_file}: object {k} has class name {name!r}, which {reason}"
                    if strict:
                        raise DatasetError(message)
                    self.problems.append(("unknown class", str(xml_file), message))
                    continue
                box_ids.append(f"{xml_file.name}/object {k}")
                box_files.append(xml_file)
                box_image.append(len(self.images))
                labels.append(label_of[name])
                crowd.append(difficult)
                boxes.append(box)
            self.images.append(info)
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        # VOC pixel coordinates are 1-based and inclusive: a box over the whole of a W-pixel-wide
        # image is xmin=1, xmax=W. Ours are 0-based with x2 exclusive ([0, W]), so only the
        # top-left corner moves: (x1 - 1, y1 - 1, x2, y2).
        boxes[:, :2] -= 1
        self._group_boxes(self.root, box_image, boxes, labels, crowd, box_ids, box_files)
        self.image_ids = list(range(len(self.images)))


def _parse_voc_xml(xml_file, image_dir, *, size=True):
    """One VOC annotation file -> (info, objects).

    info: {"file_name", "width", "height", "xml", "path", "source"}; objects: [(name, difficult,
    [xmin, ymin, xmax, ymax])] in the file's own 1-based coordinates. The image is image_dir /
    <filename>; its size comes from <size>, or from the image's header when the xml has none
    (size=False: not looked for, for a pass that wants the class names only).
    """
    try:
        tree = ET.parse(xml_file).getroot()
    except FileNotFoundError:
        raise DatasetError(f"{xml_file}: annotation file not found") from None
    except ET.ParseError as e:
        raise DatasetError(f"{xml_file}: malformed XML ({e})") from None
    except OSError as e:
        raise DatasetError(f"{xml_file}: cannot read the annotation file ({e.strerror})") from None

    def text(node, tag, where):
        found = node.find(tag)
        if found is None or not (found.text or "").strip():
            raise DatasetError(f"{xml_file}: {where} has no <{tag}>")
        return found.text.strip()

    def number(node, tag, where):
        value = text(node, tag, where)
        try:
            return float(value)
        except ValueError:
            raise DatasetError(f"{xml_file}: {where}: <{tag}> is {value!r}, not a number") from None

    file_name = text(tree, "filename", "<annotation>")
    try:
        width = int(float(tree.findtext("size/width")))
        height = int(float(tree.findtext("size/height")))
    except (TypeError, ValueError):
        width = height = 0
    if size and (width <= 0 or height <= 0):
        # Some tools write no size, or 0: read it from the image header (cheap, no decoding).
        try:
            with Image.open(image_dir / file_name) as im:
                width, height = im.size
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetError(f"{xml_file}: no image size, and cannot read "
                               f"{image_dir / file_name} ({e})") from None
    objects = []
    for k, obj in enumerate(tree.findall("object")):
        where = f"object {k}"
        name = text(obj, "name", where)
        difficult = obj.find("difficult")
        is_difficult = difficult is not None and (difficult.text or "0").strip() not in ("0", "")
        box = obj.find("bndbox")
        if box is None:
            raise DatasetError(f"{xml_file}: {where} ({name}) has no <bndbox>")
        coords = [number(box, tag, f"{where} ({name}) <bndbox>")
                  for tag in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((name, is_difficult, coords))
    info = {"file_name": file_name, "width": width, "height": height, "xml": xml_file,
            "path": None if image_dir is None else pathlib.Path(image_dir) / file_name, "source": xml_file}
    return info, objects


# ---- your own data: folder layouts, seeded splits, check_data ---------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def split_ids(ids, *, val_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """(train ids, val ids): a seeded random split, the same for the same ids and seed whatever
    their order. round(val_fraction * n) images go to validation, at least one when n >= 2."""
    ids = sorted(ids)
    num_val = max(1, round(val_fraction * len(ids))) if len(ids) >= 2 else 0
    chosen = set(np.random.default_rng(seed).permutation(len(ids))[:num_val].tolist())
    return ([i for k, i in enumerate(ids) if k not in chosen], [i for k, i in enumerate(ids) if k in chosen])


def _split_of(path: pathlib.Path) -> str | None:
    """"train", "val" or "test" from an annotation file's name or folder (Roboflow's "valid" too)."""
    for part in (path.stem.lower(), path.parent.name.lower()):
        found = re.search(r"(?<![a-z])(train|valid|val|test)", part)
        if found:
            return "val" if found.group(1) == "valid" else found.group(1)
    return None


def _has_images(folder: pathlib.Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def coco_files(root) -> dict:
    """{split: (image folder, annotation file)} of a COCO-format folder, as exports lay it out:

        COCO 2017     annotations/instances_train2017.json, train2017/ (and val)
        CVAT          annotations/instances_default.json, images/          (one json for all)
        Label Studio  result.json, images/                                 (one json for all)
        Roboflow      train/_annotations.coco.json beside its images (valid/, test/ too)

    The split comes from each json's name or folder ("train", "val"/"valid", "test"); one json
    with no split in its name is all the data ({"all": ...}: make_datasets splits it, seeded).
    An annotation file's images are in the first of these folders that holds images: the one
    named after the file (train2017), its own folder, images/, the split's name, root.
    """
    root = pathlib.Path(root)
    found = sorted({*root.glob("*.json"), *root.glob("*/*.json")} - {root / "manifest.json"})
    if not found:
        raise DatasetError(f"{root}: no COCO annotation file (.json) found")
    by_split = {}
    for ann_file in found:
        by_split.setdefault(_split_of(ann_file) or "all", []).append(ann_file)
    if "train" in by_split and "val" in by_split:
        by_split.pop("all", None)
    elif len(found) == 1:
        by_split = {"all": found}
    else:
        raise DatasetError(f"{root}: found {len(found)} json files ({', '.join(p.name for p in found)}) "
                           "but not one for train and one for val, nor a single one for all")
    files = {}
    for split, (ann_file, *more) in by_split.items():
        if more:   # COCO 2017 keeps captions_* and person_keypoints_* beside instances_*
            instances = [p for p in (ann_file, *more) if p.name.startswith("instances_")]
            ann_file, *more = instances or (ann_file, *more)
        if more:
            raise DatasetError(f"{root}: several annotation files for {split}: {[ann_file.name] + [p.name for p in more]}")
        stem = ann_file.stem.removeprefix("instances_")
        candidates = [root / stem, ann_file.parent, root / "images", root / split, root]
        files[split] = (next((c for c in candidates if _has_images(c)), ann_file.parent), ann_file)
    return files


def own_datasets(data: str, root, *, class_names=None, seed: int = 0, val_fraction: float = 0.2,
                 strict: bool = True, quiet: bool = False):
    """(train set with flips, validation set) from a folder of your own data, read without code.

    data="coco": coco_files(root)'s layout; data="voc": a VOC or LabelImg folder, split by
    ImageSets/Main/train.txt and val.txt when they are there. Without split files (one COCO json
    for all, a VOC folder without ImageSets) the images are split by split_ids(seed), and the
    split is printed. VOC class names come from the annotations unless class_names is given,
    found over all the files so that both splits agree; they are printed in one line.
    strict=False: unknown classes and image ids are listed in each set's `problems` (check_data).
    """
    root = pathlib.Path(root)
    say = (lambda *a: None) if quiet else print
    flip = RandomHorizontalFlip(0.5)
    if data == "coco":
        files = coco_files(root)
        if "all" not in files:
            (train_dir, train_ann), (val_dir, val_ann) = files["train"], files["val"]
            train = CocoDetection(train_dir, train_ann, transforms=flip, strict=strict)
            val = CocoDetection(val_dir, val_ann, strict=strict)
            if train.class_names != val.class_names:
                raise DatasetError(f"{val_ann}: its categories {val.class_names[1:]} are not those of "
                                   f"{train_ann} {train.class_names[1:]}")
            say(f"classes (from {train_ann.name}): {', '.join(train.class_names[1:])}")
            return train, val
        image_dir, ann_file = files["all"]
        ids = [img.get("id") for img in _read_coco_json(ann_file)["images"] if isinstance(img, dict)]
        train_ids, val_ids = split_ids(ids, val_fraction=val_fraction, seed=seed)
        say(f"{ann_file.name} holds all {len(ids)} images: seeded split (seed {seed}) into "
            f"{len(train_ids)} train and {len(val_ids)} val images; val ids {_some(val_ids)}")
        train = CocoDetection(image_dir, ann_file, transforms=flip, image_ids=train_ids, strict=strict)
        val = CocoDetection(image_dir, ann_file, image_ids=val_ids, strict=strict)
        say(f"classes (from {ann_file.name}): {', '.join(train.class_names[1:])}")
    elif data == "voc":
        xml_files = voc_xml_files(root)
        names = voc_class_names(xml_files) if class_names is None else class_names
        if class_names is None:
            say(f"classes (from the annotations): {', '.join(names[1:])}")
        if (root / "ImageSets" / "Main" / "train.txt").is_file():
            return (VOCDetection(root, names, image_set="train", transforms=flip, strict=strict),
                    VOCDetection(root, names, image_set="val", strict=strict))
        train_ids, val_ids = split_ids([p.stem for p in xml_files], val_fraction=val_fraction, seed=seed)
        say(f"{root} has no ImageSets/Main/train.txt: seeded split (seed {seed}) of its {len(xml_files)} "
            f"images into {len(train_ids)} train and {len(val_ids)} val; val {_some(val_ids)}")
        train = VOCDetection(root, names, ids=train_ids, transforms=flip, strict=strict)
        val = VOCDetection(root, names, ids=val_ids, strict=strict)
    else:
        raise ValueError(f"unknown data {data!r}: expected 'coco' or 'voc'")
    return train, val


def _some(items, limit: int = 8) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def best_anchor_iou(image_sizes, boxes, *, min_size: int, max_size: int, anchor_sizes,
                    aspect_ratios=(0.5, 1.0, 2.0)) -> Tensor:
    """For every box, the best IoU any anchor of the RPN reaches with it: Float[G].

    image_sizes: [(H, W)] of the images as stored; boxes: [Float[G_i, 4]] xyxy in those pixels.
    Computed as the model sees it: each image resized as DetectionTransform resizes it (short
    side min_size, long side at most max_size; the resized size rounded down), the boxes scaled
    with it, and the anchors those of AnchorGenerator on the padded batch (a multiple of 32):
    its cell anchors (one size per level, each aspect ratio, rounded), shifted by the stride of
    each level's grid (P2..P5 a quarter to a 32nd of the padded size, P6 half of P5 rounded up).
    So a box counts only if an anchor at a real grid position fits it, not just one of its shape.
    Of the anchors of one shape, the one centred nearest the box's centre has the largest IoU
    (the overlap along x and along y only shrinks as the centres part), so each box is compared
    with L x A anchors instead of all of them; tests check this against all of them.
    """
    counts = [len(b) for b in boxes]
    if sum(counts) == 0:
        return torch.zeros(0)
    gt = torch.cat([torch.as_tensor(b, dtype=torch.float64).reshape(-1, 4) for b in boxes])   # (G, 4)
    # Each image as the model resizes it, in Python floats as DetectionTransform computes it (a
    # tensor division may round the other way, and floor(399.99999) is 399); F.interpolate rounds down.
    resized = []
    for h, w in image_sizes:
        scale = min(min_size / min(h, w), max_size / max(h, w))
        resized.append((h, w, math.floor(h * scale), math.floor(w * scale)))
    per_box = torch.tensor(resized, dtype=torch.float64).repeat_interleave(torch.tensor(counts), 0)  # (G, 4)
    hw, new_hw = per_box[:, :2], per_box[:, 2:]                        # (G, 2) h, w: stored, resized
    padded = (new_hw / 32).ceil() * 32
    gt = gt * (new_hw / hw).flip(1).repeat(1, 2)                       # resize_boxes: x by w, y by h
    centre = (gt[:, :2] + gt[:, 2:]) / 2                               # (G, 2) x, y
    pad_xy = padded.flip(1)                                            # (G, 2) w, h
    grids = [torch.div(pad_xy, s, rounding_mode="floor") for s in (4, 8, 16, 32)]
    grids.append(torch.div(grids[-1] + 1, 2, rounding_mode="floor"))   # P6: max pool, stride 2
    ious = []
    for grid, cell in zip(grids, AnchorGenerator(tuple(anchor_sizes), tuple(aspect_ratios)).cell_anchors):
        stride = torch.div(pad_xy, grid, rounding_mode="floor")       # (G, 2), as AnchorGenerator.forward
        shift = torch.minimum((centre / stride).round().clamp(min=0), grid - 1) * stride   # nearest centre
        anchors = cell.double()[None] + shift.repeat(1, 2)[:, None]    # (1, A, 4) + (G, 1, 4) -> (G, A, 4)
        ious.append(_paired_iou(gt[:, None].expand_as(anchors), anchors))  # (G, A)
    return torch.cat(ious, 1).max(1).values.float()                   # (G, L*A) -> (G,)


def _paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes a[..., 4] and b[..., 4] pair by pair (box_iou gives all pairs)."""
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# Problems check_data finds. Errors stop `train`: the data cannot be read as it is meant. Warnings
# are repaired by the readers (boxes clipped or dropped) or are worth a look (duplicates).
PROBLEM_KINDS = {
    "missing image": "error", "unreadable image": "error", "image size differs": "error",
    "unknown class": "error", "unknown image": "error",
    "degenerate box": "warning", "box outside the image": "warning",
    "box partly outside the image": "warning", "duplicate image": "warning", "duplicate box": "warning",
}
# Best possible recall below these, at IoU 0.7 or 0.3: look for better anchors. With one anchor size
# per level, doubling, a square object sqrt(2) times an anchor's side reaches IoU 0.5 at best: half
# the objects of a spread of sizes below 0.7 is normal (the RPN also makes each object's best anchor
# a positive, whatever its IoU); an object with no anchor at 0.3 is one the RPN barely sees.
ANCHOR_FIT_LOW = {0.7: 0.5, 0.3: 0.98}
DUPLICATE_BOX_IOU = 0.95      # two boxes of one class in one image overlapping this much: one object


@dataclass
class DataReport:
    """What check_data found. problems: [(severity, kind, file, detail)]; box_sides: each
    object's sqrt(w * h) at the model's scale (px); best_iou: its best anchor IoU (best_anchor_iou)."""
    images: dict                     # {split: number of images}
    empty_images: dict               # {split: images without objects}
    objects: dict                    # {class name: objects, all splits}
    problems: list
    box_sides: np.ndarray
    best_iou: np.ndarray
    anchor_sizes: tuple
    min_size: int
    max_size: int
    suggestion: dict | None = None   # {"anchor_sizes", "min_size", "max_size", "fit_07", "fit_03"}

    @property
    def errors(self) -> list:
        return [p for p in self.problems if p[0] == "error"]

    def anchor_fit(self, iou: float) -> float:
        """Best possible recall at this IoU: the fraction of objects whose best anchor reaches it."""
        return float((self.best_iou >= iou).mean()) if len(self.best_iou) else 1.0

    def __str__(self) -> str:
        sides = np.percentile(self.box_sides, [5, 50, 95]) if len(self.box_sides) else [0, 0, 0]
        lines = [
            "images: " + ", ".join(f"{s} {n} ({self.empty_images[s]} empty)" for s, n in self.images.items()),
            f"objects: {sum(self.objects.values())} (" + ", ".join(f"{k} {v}" for k, v in self.objects.items()) + ")",
            f"box sides sqrt(w*h) at the model's scale ({self.min_size}..{self.max_size}): 5% {sides[0]:.0f} px, "
            f"median {sides[1]:.0f} px, 95% {sides[2]:.0f} px; anchor sizes {', '.join(map(str, self.anchor_sizes))}",
            f"anchor fit (best possible recall): {self.anchor_fit(0.7):.1%} of objects have an anchor with "
            f"IoU >= 0.7 (an RPN positive), {self.anchor_fit(0.3):.1%} with IoU >= 0.3"]
        if self.suggestion:
            s = self.suggestion
            lines.append(f"  low: anchor_sizes={tuple(s['anchor_sizes'])}, min_size={s['min_size']}, "
                         f"max_size={s['max_size']} would fit {s['fit_07']:.1%} at 0.7, {s['fit_03']:.1%} at 0.3")
        errors = len(self.errors)
        lines.append(f"problems: {errors} error(s), {len(self.problems) - errors} warning(s)")
        lines += [f"  {sev:7s} {kind}: {file}: {detail}" for sev, kind, file, detail in self.problems]
        return "\n".join(lines)


def check_data(datasets: dict, *, min_size: int, max_size: int, anchor_sizes, progress: bool = True,
               max_anchor_images: int = 2000) -> DataReport:
    """Check datasets ({split: CocoDetection or VOCDetection, read with strict=False}) before any
    training, and report (DataReport):

    - images, empty images, objects per class (crowd / difficult objects included);
    - every problem with its file: what the readers listed (unknown classes or image ids, boxes
      degenerate or outside the image), images missing, unreadable or of another size than the
      annotation says, duplicate images (the same bytes twice, in any splits), duplicate boxes
      (one class, one image, IoU >= DUPLICATE_BOX_IOU);
    - the anchors' fit, as the "best possible recall" of YOLOv5's AutoAnchor: best_anchor_iou of
      every object that trains (not crowd), on at most max_anchor_images images a split (a seeded
      sample), reported as the fraction at IoU >= 0.7 (an RPN positive) and >= 0.3 (not a
      negative). Below ANCHOR_FIT_LOW, the profile's anchor sizes scaled by 2^(k/4), k = -3..3,
      are tried (with a min_size that brings the objects' 5th percentile side up to the smallest
      anchor, when it is below half of it); the best at 0.7 that keeps the fit at 0.3 (or
      ANCHOR_FIT_LOW's) is suggested when it fits 5 points better at 0.7.
    """
    problems, images, empty, objects, seen = [], {}, {}, {}, {}
    sizes, gt_boxes, sides = [], [], []
    for split, ds in datasets.items():
        problems += [(PROBLEM_KINDS[kind], kind, file, detail) for kind, file, detail in ds.problems]
        images[split], empty[split] = len(ds), 0
        sample = set(range(len(ds)))
        if len(ds) > max_anchor_images:
            sample = set(np.random.default_rng(0).choice(len(ds), max_anchor_images, replace=False).tolist())
        for i in tqdm(range(len(ds)), desc=f"check {split}", disable=not progress, leave=False):
            info, target = ds.images[i], ds.target(i)
            path = ds.image_path(i)
            empty[split] += len(target["boxes"]) == 0
            for label in target["labels"].tolist():
                objects[ds.class_names[label]] = objects.get(ds.class_names[label], 0) + 1
            try:
                content = pathlib.Path(path).read_bytes()
                with Image.open(io.BytesIO(content)) as im:
                    width, height = im.size
            except FileNotFoundError:
                problems.append(("error", "missing image", str(path), f"named by {info['source']}"))
                continue
            except (OSError, UnidentifiedImageError) as e:
                problems.append(("error", "unreadable image", str(path), f"{type(e).__name__}: {e}"))
                continue
            if (width, height) != (info["width"], info["height"]):
                problems.append(("error", "image size differs", str(path), f"{width}x{height} pixels, but "
                                 f"{info['source']} says {info['width']}x{info['height']}"))
            seen.setdefault(hashlib.sha1(content).hexdigest(), set()).add(str(path))
            boxes, labels = target["boxes"], target["labels"]
            same_class = labels[:, None] == labels[None, :]                      # (G, G)
            overlap = torch.triu(box_iou(boxes, boxes) >= DUPLICATE_BOX_IOU, diagonal=1) & same_class
            for a, b in overlap.nonzero().tolist():
                problems.append(("warning", "duplicate box", str(info["source"]),
                                 f"{info['file_name']}: boxes {a} and {b} ({ds.class_names[labels[a]]}) "
                                 f"overlap with IoU {box_iou(boxes[a:a + 1], boxes[b:b + 1]).item():.2f}"))
            trains = ~target["iscrowd"]
            if i in sample and trains.any():
                sizes.append((height, width))
                gt_boxes.append(boxes[trains])
                scale = min(min_size / min(height, width), max_size / max(height, width))
                wh = (boxes[trains, 2:] - boxes[trains, :2]) * scale
                sides.append(wh.prod(1).sqrt())

    for paths in seen.values():   # the same bytes in several files: each after the first, by name
        first, *others = sorted(paths)
        problems += [("warning", "duplicate image", p, f"the same bytes as {first}") for p in others]
    problems = list(dict.fromkeys(problems))   # a split of one json for all: its problems are the other's too

    def fit(anchors, min_side, max_side):
        return best_anchor_iou(sizes, gt_boxes, min_size=min_side, max_size=max_side, anchor_sizes=anchors).numpy()

    best = fit(anchor_sizes, min_size, max_size)
    box_sides = torch.cat(sides).numpy() if sides else np.zeros(0)
    report = DataReport(images, empty, dict(sorted(objects.items())), problems, box_sides, best,
                        tuple(anchor_sizes), min_size, max_size)
    if len(best) and (report.anchor_fit(0.7) < ANCHOR_FIT_LOW[0.7] or report.anchor_fit(0.3) < ANCHOR_FIT_LOW[0.3]):
        # Objects smaller than half the smallest anchor: enlarge the images (min_size), then try
        # the anchor sizes scaled by quarter octaves, and keep the best fit at 0.7.
        small = float(np.percentile(box_sides, 5))
        factor = anchor_sizes[0] / max(small, 1.0) if small < anchor_sizes[0] / 2 else 1.0
        new_min = int(math.ceil(min_size * factor / 32) * 32)
        new_max = int(math.ceil(max_size * new_min / min_size / 32) * 32)
        tried = []
        for k in range(-3, 4):
            anchors = tuple(int(round(a * 2 ** (k / 4))) for a in anchor_sizes)
            if (anchors, new_min) != (tuple(anchor_sizes), min_size):
                ious = fit(anchors, new_min, new_max)
                tried.append(((ious >= 0.7).mean(), ious.mean(), (ious >= 0.3).mean(), anchors))
        floor_03 = min(report.anchor_fit(0.3), ANCHOR_FIT_LOW[0.3])   # not at the cost of the fit at 0.3
        fit_07, _, fit_03, anchors = max((t for t in tried if t[2] >= floor_03), default=(0, 0, 0, None))
        # (the best fit at 0.7; on a tie, the best mean IoU)
        if fit_07 >= report.anchor_fit(0.7) + 0.05:
            report.suggestion = {"anchor_sizes": anchors, "min_size": new_min, "max_size": new_max,
                                 "fit_07": float(fit_07), "fit_03": float(fit_03)}
    return report


class DataCheckFailed(DatasetError):
    """check_data found errors: training does not start. The report was printed above."""


def check_before_training(data: str, root, cfg, *, verbose: bool = True, progress: bool = True) -> DataReport:
    """The check `train` runs on your own data before its first step: check_data on
    own_datasets(strict=False), the report printed; DataCheckFailed when it lists errors."""
    train_set, val_set = own_datasets(data, root, seed=cfg.seed, strict=False, quiet=True)
    report = check_data({"train": train_set, "val": val_set}, min_size=cfg.min_size, max_size=cfg.max_size,
                        anchor_sizes=tuple(cfg.anchor_sizes), progress=verbose and progress)
    if verbose:
        print(f"check-data {data} {root}\n{report}")
    if report.errors:
        raise DataCheckFailed(f"check-data found {len(report.errors)} error(s) in {root} (listed above), "
                              f"the first: {report.errors[0][2]}: {report.errors[0][1]}; training not started")
    return report


# ---- a small dataset of your own, written as annotation tools write theirs ----------------------

GLYPH_CLASSES = ("__background__", "F", "G", "K", "R", "Z")   # letters: classes the shapes model never saw
_GLYPH_SIDE = (112, 176)          # image width and height are drawn from this range (px)
_GLYPH_HEIGHT = (14, 72)          # font size range (px); a glyph's box is its drawn pixels
_GLYPH_MAX_OBJECTS = 4


def draw_glyphs_image(rng) -> tuple[np.ndarray, list]:
    """One image of 0..4 letters (GLYPH_CLASSES) on a noisy gradient: (pixels uint8 (H, W, 3),
    [(class name, [x1, y1, x2, y2])]) with boxes on the letters' drawn pixels, not overlapping."""
    from PIL import ImageFont
    height, width = (int(v) for v in rng.integers(*_GLYPH_SIDE, size=2))
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    background = c0 + (c1 - c0) * (xs * rng.uniform(-1, 1) + ys * rng.uniform(-1, 1))[..., None] / 2
    image = Image.fromarray(np.clip(background + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8))
    objects = []
    for _ in range(int(rng.integers(0, _GLYPH_MAX_OBJECTS + 1))):
        name = GLYPH_CLASSES[int(rng.integers(1, len(GLYPH_CLASSES)))]
        font = ImageFont.load_default(size=int(rng.integers(*_GLYPH_HEIGHT)))
        mask = Image.new("L", (width, height))
        x, y = int(rng.integers(0, width * 3 // 4)), int(rng.integers(-4, height * 3 // 4))
        ImageDraw.Draw(mask).text((x, y), name, fill=255, font=font)
        box = mask.getbbox()                             # (x1, y1, x2, y2), x2/y2 exclusive, or None
        if box is None or (box[2] - box[0]) * (box[3] - box[1]) < 64 or any(
                box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for _, b in objects):
            continue                                     # off the image, too small, or overlapping
        colour = tuple(int(v) for v in 255 - np.asarray(image).reshape(-1, 3).mean(0) + rng.integers(-40, 40, 3))
        image.paste(Image.new("RGB", image.size, colour), mask=mask)
        objects.append((name, list(box)))
    return np.asarray(image), objects


def write_voc_folder(root, samples) -> pathlib.Path:
    """Write samples [(file name, pixels (H, W, 3), [(class name, [x1, y1, x2, y2])])] as LabelImg
    does: root/<name>.png with root/<name>.xml beside it (VOC's 1-based inclusive pixels)."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for file_name, pixels, objects in samples:
        Image.fromarray(pixels).save(root / file_name, compress_level=1)
        height, width = pixels.shape[:2]
        xml = "".join(f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin>"
                      f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                      for name, (x1, y1, x2, y2) in objects)
        (root / file_name).with_suffix(".xml").write_text(
            f"<annotation><folder>{root.name}</folder><filename>{file_name}</filename><size><width>{width}"
            f"</width><height>{height}</height><depth>3</depth></size>{xml}</annotation>\n")
    return root


def write_coco_folder(root, samples, class_names) -> pathlib.Path:
    """Write samples (as write_voc_folder's) as CVAT exports COCO: root/images/<name> and one
    json for all, root/annotations/instances_default.json (bbox [x, y, w, h], ids from 1)."""
    root = pathlib.Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    cat_id = {name: k for k, name in enumerate(class_names) if k > 0}
    images, annotations = [], []
    for image_id, (file_name, pixels, objects) in enumerate(samples, start=1):
        Image.fromarray(pixels).save(root / "images" / file_name, compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": pixels.shape[1], "height": pixels.shape[0]})
        for name, (x1, y1, x2, y2) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[name],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    _write_json_atomic(root / "annotations" / "instances_default.json",
                       {"images": images, "annotations": annotations,
                        "categories": [{"id": k, "name": n} for n, k in cat_id.items()]})
    return root


def build_glyphs_dataset(root, *, num_images: int = 200, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """Notebook 07's own data: num_images images of letters (draw_glyphs_image), written twice,
    root/voc in LabelImg's layout (no ImageSets) and root/coco as CVAT's COCO export (one json
    for all). Deterministic by seed. Returns (voc folder, coco folder)."""
    root = pathlib.Path(root)
    samples = []
    for i in tqdm(range(1, num_images + 1), desc="glyphs", unit="img", leave=False):
        pixels, objects = draw_glyphs_image(np.random.default_rng([seed, i]))
        samples.append((f"{i:05d}.png", pixels, objects))
    return write_voc_folder(root / "voc", samples), write_coco_folder(root / "coco", samples, GLYPH_CLASSES)


# ---- transforms and batching -----------------------------------------------------------------

class RandomHorizontalFlip:
    """Mirror image and boxes left-right with probability p: x1' = W - x2, x2' = W - x1.

    With boxes in 0-based pixel edges ([0, W]) the flip is exact and its own inverse; no
    "- 1" appears, which is where 1-based pixel-centre conventions go wrong.
    Draws from torch's generator, which make_data_loader seeds per worker.
    """

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, target):
        if torch.rand(1).item() >= self.p:
            return image, target
        width = image.shape[-1]
        boxes = target["boxes"]
        # (N, 4) x1 y1 x2 y2 -> W - x2, y1, W - x1, y2
        flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
        return image.flip(-1), {**target, "boxes": flipped.reshape(-1, 4)}

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms on (image, target) pairs one after another."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self):
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


def collate_fn(batch):
    """[(image, target), ...] -> ([image, ...], [target, ...]).

    Images are not stacked: they differ in size, and the model resizes and pads them itself.
    """
    images, targets = zip(*batch)
    return list(images), list(targets)


def _seed_worker(worker_id):
    # torch seeds each worker from the loader's generator; numpy is seeded from it too, for
    # transforms that draw from numpy.
    np.random.seed(torch.initial_seed() % 2**32)


def make_data_loader(dataset, *, batch_size, shuffle, num_workers=None, seed=0, sampler=None,
                     drop_last=False):
    """A DataLoader of (list of images, list of targets) batches, reproducible by seed.

    num_workers=None: no worker processes for small sets (under 64 images, where starting them
    costs more than it saves), else min(2, CPU count). Workers persist across epochs.
    A sampler (e.g. DistributedSampler) takes the place of shuffle.
    """
    if num_workers is None:
        num_workers = 0 if len(dataset) < 64 else min(2, os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(seed)             # shuffling order and worker seeds
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=num_workers, collate_fn=collate_fn, drop_last=drop_last,
        persistent_workers=num_workers > 0, worker_init_fn=_seed_worker, generator=generator,
        pin_memory=torch.cuda.is_available())


# =============================================================================================
# 02 backbone: Bottleneck, ResNet50, FPN
# =============================================================================================
# Bottleneck — the ResNet block: 1x1, 3x3 (stride), 1x1, plus the shortcut
# ResNet, ResNet50 — C2..C5; freeze, fold_batchnorm, load_torchvision_state_dict
# FPN — P2..P6 from C2..C5
# sample_photo — a real photo (Grace Hopper) to look at features on
# imagenet_resnet50_state_dict, torchvision_weights — torchvision's published weights, or None
# FrozenBatchNorm2d, fold_batchnorm — BatchNorm with fixed statistics; folded into a conv
# BackboneWithFPN, resnet_fpn_backbone — ResNet + FPN, of any depth and width
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


def fold_batchnorm(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """One conv that computes bn(conv(x)), for inference.

    Frozen BatchNorm is an affine map per channel, y = x * scale + shift, and a conv is
    linear, so the two fold into one conv: weight * scale (each output channel scaled),
    bias * scale + shift. That saves two passes over every activation of the backbone.
    bn: FrozenBatchNorm2d, or nn.BatchNorm2d in eval mode (in training mode it normalises
    with the batch's statistics, which no fixed conv can do).
    """
    if isinstance(bn, nn.BatchNorm2d) and bn.training:
        raise ValueError("fold_batchnorm: a BatchNorm2d in training mode uses batch statistics; "
                         "call .eval() before folding")
    with torch.no_grad():
        scale = (bn.running_var + bn.eps).rsqrt()
        if bn.weight is not None:
            scale = bn.weight * scale
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        bias = shift if conv.bias is None else conv.bias * scale + shift
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                           device=conv.weight.device, dtype=conv.weight.dtype)
        folded.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))  # (out, in, kh, kw) * (out, 1, 1, 1)
        folded.bias.copy_(bias)
    return folded.requires_grad_(False)


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
        # In place (relu_, +=) on tensors made just above, whose backward never reads them:
        # a ResNet's activations are most of its memory traffic, and each copy saved counts.
        out = F.relu_(self.bn1(self.conv1(x)))
        out = F.relu_(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return F.relu_(out)


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
        x = F.relu_(self.bn1(self.conv1(x)))                  # (N, width, H/2, W/2)
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

    def fold_batchnorm(self) -> "ResNet":
        """For inference, in place: fold every BatchNorm into the conv before it
        (fold_batchnorm) and put nn.Identity where it was. Returns self; a second call
        finds nothing left to fold."""
        def fold(conv, bn):
            return (conv, bn) if isinstance(bn, nn.Identity) else (fold_batchnorm(conv, bn), nn.Identity())

        self.conv1, self.bn1 = fold(self.conv1, self.bn1)
        for block in (*self.layer1, *self.layer2, *self.layer3, *self.layer4):
            block.conv1, block.bn1 = fold(block.conv1, block.bn1)
            block.conv2, block.bn2 = fold(block.conv2, block.bn2)
            block.conv3, block.bn3 = fold(block.conv3, block.bn3)
            if block.downsample is not None:  # Sequential(conv, bn)
                block.downsample = nn.Sequential(*fold(*block.downsample))
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


def torchvision_weights(weights: str, path: str | os.PathLike | None = None) -> dict | None:
    """A state dict of torchvision's published weights, e.g. "ResNet50_Weights.IMAGENET1K_V1": from
    a local file when `path` is given, else downloaded through torchvision's cache. None, with one
    line saying why, when neither can be had (an offline machine, a missing or corrupt file)."""
    try:
        if path:
            return torch.load(path, map_location="cpu", weights_only=True)
        from torchvision.models import get_weight  # the weight source only; the model never calls torchvision
        return get_weight(weights).get_state_dict(progress=False)
    except Exception as err:  # every failure here means the same: go on without them
        print(f"torchvision weights {weights} not available ({type(err).__name__}: {str(err)[:80]}); "
              "going on without them.")
        return None


def imagenet_resnet50_state_dict(path: str | os.PathLike | None = None) -> dict | None:
    """torchvision's ImageNet ResNet50 weights (IMAGENET1K_V1), or None: see torchvision_weights."""
    return torchvision_weights("ResNet50_Weights.IMAGENET1K_V1", path)


def sample_photo() -> Tensor:
    """A real photo (Grace Hopper, 512x600, shipped with matplotlib) as FloatTensor[3, H, W]."""
    import matplotlib.cbook
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        rgb = Image.open(f).convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255


# =============================================================================================
# 03 rpn: boxes, anchors, box coding, matching, sampling, NMS, the Region Proposal Network
# =============================================================================================
# AnchorGenerator — anchors of every level, one size per level, three aspect ratios
# BoxCoder — box <-> deltas (Eq. 2)
# Matcher — anchors (or proposals) to ground-truth boxes by IoU
# box_area, box_iou — areas; IoU of every pair
# BalancedSampler — positives and negatives, at most a fraction positive
# RPNHead, flatten_head_outputs — the head's maps, one row per anchor
# clip_boxes_to_image, remove_small_boxes — proposal clean-up
# nms — greedy non-maximum suppression, vectorised in blocks
# batched_nms — NMS within each category, by coordinate offsets
# RegionProposalNetwork — anchors + head + proposal selection + loss
"""Section 03. The Region Proposal Network (Ren et al., 2015, Sec. 3.1) slides a small head
over every pyramid level and, at each location, scores A anchors for "object or not" and
regresses a box from each.

    anchors         (sum_l H_l*W_l*A, 4)  one set per image, level-major, location, anchor
    objectness      (N, sum_l H_l*W_l*A)  logits
    pred_deltas     (N, sum_l H_l*W_l*A, 4)  (dx, dy, dw, dh), Eq. 2
    proposals       list of N tensors (R_i, 4), at most post_nms_top_n each

Every op here (box_iou, nms, batched_nms) is written from scratch with the arithmetic of
torchvision.ops, so results agree to the last bit where the order of operations agrees.
Above 1000 boxes torchvision's batched_nms changes method; batched_nms follows it there
through the appendix (batched_nms_by_category).
"""


def box_area(boxes: Tensor) -> Tensor:
    """(N, 4) -> (N,)"""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over union of every pair: (N, 4) x (M, 4) -> (N, M)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    # overlap width and height, (N, M) each: x and y apart saves building (N, M, 2) tensors
    w = (torch.min(boxes1[:, None, 2], boxes2[None, :, 2]) - torch.max(boxes1[:, None, 0], boxes2[None, :, 0]))
    h = (torch.min(boxes1[:, None, 3], boxes2[None, :, 3]) - torch.max(boxes1[:, None, 1], boxes2[None, :, 1]))
    inter = w.clamp_(min=0) * h.clamp_(min=0)
    return inter / (area1[:, None] + area2[None, :] - inter)


def clip_boxes_to_image(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clamp x to [0, W] and y to [0, H]; boxes (..., 4), image_size (H, W)."""
    height, width = image_size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose width and height are both >= min_size."""
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]


def _float32_above(threshold: float) -> float:
    """The smallest float32 greater than `threshold`. torchvision compares a float32 IoU with
    a float64 threshold; `iou >= _float32_above(t)` is that same test in float32 arithmetic
    (a plain `iou > t` rounds t to float32 first, and 0.3 rounds up)."""
    t = np.float32(threshold)
    # float(t): compared in float64 (NumPy would round `threshold` to float32 first)
    return float(t) if float(t) > threshold else float(np.nextafter(t, np.float32(np.inf)))


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, *, max_keep: int | None = None,
        block: int = 128) -> Tensor:
    """Greedy non-maximum suppression: visit boxes from the highest score down and keep a box
    unless a box already kept overlaps it with IoU > iou_threshold. Returns the kept indices,
    by decreasing score (ties: lower index first), as torchvision.ops.nms does; with max_keep,
    only the first max_keep of them (the same as slicing the full answer, and cheaper).

    Greedy NMS is sequential, but it need not be a Python loop over boxes. The sorted boxes
    are settled `block` at a time. Within a block, S[i, j] = "i would suppress j" (i < j,
    IoU > threshold), and the kept set is the one fixed point of
        keep[j] = alive[j] and not any_i(keep[i] and S[i, j]),
    where alive[j] = "no box kept in an earlier block suppresses j". Iterating that equation
    from keep = alive settles box j one step after every box before it that can suppress it:
    a handful of matrix-vector steps per block. Once max_keep boxes are kept, the boxes
    after them cannot change the answer: stop there.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True)[1]
    boxes = boxes[order]                                                      # (B, 4) by score
    threshold = _float32_above(iou_threshold)
    kept, num_kept = [], 0                 # positions in `boxes` of the kept boxes, block by block
    for start in range(0, len(boxes), block):
        blk_boxes = boxes[start:start + block]                                # (b, 4)
        suppresses = (box_iou(blk_boxes, blk_boxes) >= threshold).triu_(diagonal=1)  # (b, b), i < j
        alive = torch.ones(len(blk_boxes), dtype=torch.bool, device=boxes.device)
        if kept:
            alive = ~(box_iou(boxes[torch.cat(kept)], blk_boxes) >= threshold).any(dim=0)  # (K, b) -> (b,)
        keep = alive
        while True:
            new_keep = alive & ~(suppresses & keep[:, None]).any(dim=0)
            if torch.equal(new_keep, keep):
                break
            keep = new_keep
        kept.append(torch.where(keep)[0] + start)
        num_kept += len(kept[-1])
        if max_keep is not None and num_kept >= max_keep:
            break
    return order[torch.cat(kept)[:max_keep]]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, *,
                max_keep: int | None = None) -> Tensor:
    """NMS within each category of `idxs` independently (categories never suppress each other);
    kept indices by decreasing score, the first max_keep of them when given.

    Shift each category's boxes to its own region of the plane, by an offset larger than any
    coordinate: boxes of different categories are then disjoint, and one nms does all of them.

    Above 1000 boxes (4000 numbers; 25000 boxes on a GPU) torchvision.ops.batched_nms runs
    each category alone instead, whose float rounding (no offsets) and order of exactly equal
    scores (an unstable sort) differ; so does this function there, through
    batched_nms_by_category (Appendix: speed and parity), so that every result agrees with
    torchvision's to the bit.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if boxes.numel() > (4000 if boxes.device.type == "cpu" else 100_000):
        return batched_nms_by_category(boxes, scores, idxs, iou_threshold, max_keep=max_keep)
    offsets = idxs.to(boxes) * (boxes.max() + 1)                              # (B,)
    return nms(boxes + offsets[:, None], scores, iou_threshold, max_keep=max_keep)


class AnchorGenerator(nn.Module):
    """Anchors for every location of every pyramid level (Ren et al., 2015, Sec. 3.1.1).

    Level l has one size (32, 64, 128, 256, 512 for P2..P6) and three aspect ratios h/w of
    0.5, 1 and 2, all of area size^2; a cell anchor is centred on 0 and rounded to whole
    pixels, then shifted to every location (x * stride, y * stride).
    """

    def __init__(self, sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0)):
        super().__init__()
        self.sizes, self.aspect_ratios = tuple(sizes), tuple(aspect_ratios)
        self.cell_anchors = [self.cell_anchor(s, aspect_ratios) for s in sizes]  # (A, 4) each

    @staticmethod
    def cell_anchor(size: float, aspect_ratios) -> Tensor:
        """(A, 4) anchors of one size centred on (0, 0): w = size / sqrt(r), h = size * sqrt(r)."""
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws, hs = w_ratios * size, h_ratios * size
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.aspect_ratios)

    def grid_anchors(self, grid_size: tuple[int, int], stride: tuple[int, int], cell: Tensor) -> Tensor:
        """(H*W*A, 4) anchors of one level, location-major then anchor: the order the head's
        outputs are flattened in."""
        (grid_h, grid_w), (stride_h, stride_w) = grid_size, stride
        shifts_x = torch.arange(grid_w, dtype=torch.int32, device=cell.device) * stride_w
        shifts_y = torch.arange(grid_h, dtype=torch.int32, device=cell.device) * stride_h
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
        return (shifts + cell.reshape(1, -1, 4)).reshape(-1, 4)  # (H*W, 1, 4) + (1, A, 4)

    def forward(self, batch_shape: tuple[int, int], features) -> Tensor:
        """batch_shape: the padded batch's (H, W); features: P2..P6. Returns (sum H*W*A, 4).
        The stride is the padded size divided by the grid size, rounded down (64 for P6 only
        when the size divides by 64): the convention torchvision's weights were trained with."""
        anchors = []
        for feature, cell in zip(features, self.cell_anchors):
            grid = feature.shape[-2:]
            stride = (batch_shape[0] // grid[0], batch_shape[1] // grid[1])
            anchors.append(self.grid_anchors(grid, stride, cell.to(feature.device, feature.dtype)))
        return torch.cat(anchors)


class BoxCoder:
    """Box regression parameterisation (Ren et al., 2015, Eq. 2; Girshick et al., 2014, App. C):

        dx = wx (x - x_a) / w_a    dy = wy (y - y_a) / h_a    dw = ww log(w / w_a)    dh = wh log(h / h_a)

    with (x, y) box centres. The box head's weights (10, 10, 5, 5) are 1 / (0.1, 0.1, 0.2, 0.2),
    py-faster-rcnn's BBOX_NORMALIZE_STDS: the typical spread of second-stage targets, which they
    bring to about unit size. The RPN's (1, 1, 1, 1) leave its targets small (std about 0.1 for
    the centre, 0.3 for the size on the embedded set), hence smooth L1's beta = 1/9. decode
    clamps dw, dh at log(1000/16), so that one wild prediction cannot overflow exp().
    """

    def __init__(self, weights=(1.0, 1.0, 1.0, 1.0), clamp: float = math.log(1000.0 / 16)):
        self.weights, self.clamp = weights, clamp

    def encode(self, gt_boxes: Tensor, ref_boxes: Tensor) -> Tensor:
        """Deltas that take ref_boxes (R, 4) to gt_boxes (R, 4): (R, 4)."""
        wx, wy, ww, wh = self.weights
        ref_w, ref_h = ref_boxes[:, 2] - ref_boxes[:, 0], ref_boxes[:, 3] - ref_boxes[:, 1]
        ref_x, ref_y = ref_boxes[:, 0] + 0.5 * ref_w, ref_boxes[:, 1] + 0.5 * ref_h
        gt_w, gt_h = gt_boxes[:, 2] - gt_boxes[:, 0], gt_boxes[:, 3] - gt_boxes[:, 1]
        gt_x, gt_y = gt_boxes[:, 0] + 0.5 * gt_w, gt_boxes[:, 1] + 0.5 * gt_h
        return torch.stack((wx * (gt_x - ref_x) / ref_w, wy * (gt_y - ref_y) / ref_h,
                            ww * torch.log(gt_w / ref_w), wh * torch.log(gt_h / ref_h)), dim=1)

    def decode(self, deltas: Tensor, ref_boxes: Tensor) -> Tensor:
        """Apply deltas (R, 4*J) to ref_boxes (R, 4): boxes (R, J, 4), J = 1 (RPN) or K (box head)."""
        ref_boxes = ref_boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths, heights = ref_boxes[:, 2] - ref_boxes[:, 0], ref_boxes[:, 3] - ref_boxes[:, 1]
        ctr_x, ctr_y = ref_boxes[:, 0] + 0.5 * widths, ref_boxes[:, 1] + 0.5 * heights
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy              # (R, J)
        dw = (deltas[:, 2::4] / ww).clamp(max=self.clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.clamp)
        pred_x, pred_y = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
        # 0.5 * (w * exp(dw)), in this order, as torchvision rounds it
        half_w, half_h = 0.5 * (torch.exp(dw) * widths[:, None]), 0.5 * (torch.exp(dh) * heights[:, None])
        return torch.stack((pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h), dim=2)


class Matcher:
    """Assign each prediction (anchor or proposal) to its best ground-truth box by IoU:

        IoU >= high            -> that GT's index (foreground)
        low <= IoU < high      -> BETWEEN (-2, ignored in the loss)
        IoU < low              -> BELOW (-1, background)

    With allow_low_quality_matches, each GT also claims the predictions that overlap it most
    (ties included), even below `high`, so that no GT is left without a positive
    (Ren et al., 2015, Sec. 3.1.2, condition (i)).
    """

    BELOW, BETWEEN = -1, -2

    def __init__(self, high: float, low: float, *, allow_low_quality_matches: bool):
        self.high, self.low, self.allow_low_quality_matches = high, low, allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """iou (G, P) -> matched GT index or BELOW / BETWEEN for each prediction, (P,) int64."""
        best_iou, matches = iou.max(dim=0)
        best_gt_for_pred = matches.clone()
        matches[best_iou < self.low] = self.BELOW
        matches[(best_iou >= self.low) & (best_iou < self.high)] = self.BETWEEN
        if self.allow_low_quality_matches:
            best_iou_for_gt = iou.max(dim=1).values                      # (G,)
            preds = torch.where(iou == best_iou_for_gt[:, None])[1]
            matches[preds] = best_gt_for_pred[preds]
        return matches


class BalancedSampler:
    """Sample `batch_size_per_image` labels per image, at most `positive_fraction` of them
    positive (label >= 1), the rest negative (label 0); -1 is never sampled. Without this,
    the ~100k negative anchors of an image would drown its dozen positives."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """labels: per image (P_i,) -> (positive indices, negative indices) per image."""
        pos_idx, neg_idx = [], []
        for labels_i in labels:
            positive = torch.where(labels_i >= 1)[0]
            negative = torch.where(labels_i == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            # randperm in this order (positives, then negatives, image by image) draws the same
            # samples as torchvision's sampler under the same seed: the parity tests rely on it.
            pos_perm = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
            neg_perm = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
            # sorted, so the losses sum their terms in a fixed (index) order
            pos_idx.append(positive[pos_perm].sort().values)
            neg_idx.append(negative[neg_perm].sort().values)
        return pos_idx, neg_idx


class RPNHead(nn.Module):
    """A 3x3 conv (+ReLU) shared by all levels, then two 1x1 convs: A objectness logits and
    4A box deltas per location.  (N, C, H, W) -> (N, A, H, W), (N, 4A, H, W) per level."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in features:
            t = F.relu_(self.conv(feature))
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def flatten_head_outputs(logits: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-level head maps -> one row per anchor, in the anchors' order:
    (N, A, H, W) -> (N, H*W*A);  (N, A*4, H, W) -> (N, H*W*A, 4); levels concatenated."""
    flat_logits, flat_deltas = [], []
    for lg, dl in zip(logits, deltas):
        n, a, h, w = lg.shape
        flat_logits.append(lg.permute(0, 2, 3, 1).reshape(n, h * w * a))
        # (N, A*4, H, W) -> (N, A, 4, H, W) -> (N, H, W, A, 4) -> (N, H*W*A, 4)
        flat_deltas.append(dl.reshape(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * a, 4))
    return torch.cat(flat_logits, dim=1), torch.cat(flat_deltas, dim=1)


class RegionProposalNetwork(nn.Module):
    """Anchors + head + proposal selection (+ the RPN loss when training).

    Settings are plain numbers, all keyword-only; their defaults live in FasterRCNN.
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: RPNHead, *, fg_iou_thresh: float,
                 bg_iou_thresh: float, batch_size_per_image: int, positive_fraction: float,
                 pre_nms_top_n_train: int, pre_nms_top_n_test: int, post_nms_top_n_train: int,
                 post_nms_top_n_test: int, nms_thresh: float, score_thresh: float = 0.0,
                 min_size: float = 1e-3):
        super().__init__()
        self.anchor_generator, self.head = anchor_generator, head
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n = {True: pre_nms_top_n_train, False: pre_nms_top_n_test}
        self.post_nms_top_n = {True: post_nms_top_n_train, False: post_nms_top_n_test}
        self.nms_thresh, self.score_thresh, self.min_size = nms_thresh, score_thresh, min_size

    def forward(self, batch_shape, image_sizes, features, targets=None):
        """features P2..P6 -> (proposals: list of (R_i, 4), their objectness probabilities: list of
        (R_i,), losses: dict, empty unless training)."""
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(batch_shape, features)       # (P, 4), same for all images
        num_per_level = [lg[0].numel() for lg in logits]             # H_l * W_l * A
        objectness, pred_deltas = flatten_head_outputs(logits, deltas)  # (N, P), (N, P, 4)
        num_images = objectness.shape[0]
        # Proposals are inputs to the box head, not something to back-propagate through
        # (Ren et al., 2015, Sec. 3.2, approximate joint training): decode detached deltas.
        proposals = self.box_coder.decode(pred_deltas.detach().reshape(-1, 4),
                                          anchors.repeat(num_images, 1)).reshape(num_images, -1, 4)
        boxes, scores = self.select_proposals(proposals, objectness.detach(), image_sizes, num_per_level)
        losses = {}
        if self.training:
            losses = self.loss(anchors, objectness, pred_deltas, targets)
        return boxes, scores, losses

    def select_proposals(self, proposals: Tensor, objectness: Tensor, image_sizes, num_per_level):
        """(N, P, 4), (N, P) -> per image: top-k per level, sigmoid, clip, drop tiny boxes,
        NMS within each level, keep the best post_nms_top_n."""
        device = proposals.device
        top_idx, levels = [], []
        for level, (start, logits) in enumerate(zip(
                torch.tensor([0] + num_per_level[:-1]).cumsum(0).tolist(),
                objectness.split(num_per_level, dim=1))):
            k = min(self.pre_nms_top_n[self.training], logits.shape[1])
            top_idx.append(logits.topk(k, dim=1).indices + start)   # (N, k)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=device))
        top_idx, levels = torch.cat(top_idx, dim=1), torch.cat(levels)
        batch_idx = torch.arange(proposals.shape[0], device=device)[:, None]
        proposals, scores = proposals[batch_idx, top_idx], objectness[batch_idx, top_idx].sigmoid()
        out_boxes, out_scores = [], []
        for boxes, scores_i, size in zip(proposals, scores, image_sizes):
            boxes = clip_boxes_to_image(boxes, size)
            keep = remove_small_boxes(boxes, self.min_size)
            keep = keep[scores_i[keep] >= self.score_thresh]
            boxes, scores_i, lvl = boxes[keep], scores_i[keep], levels[keep]
            keep = batched_nms(boxes, scores_i, lvl, self.nms_thresh, max_keep=self.post_nms_top_n[self.training])
            out_boxes.append(boxes[keep])
            out_scores.append(scores_i[keep])
        return out_boxes, out_scores

    def loss(self, anchors: Tensor, objectness: Tensor, pred_deltas: Tensor, targets) -> dict:
        """Binary cross-entropy on sampled anchors + smooth-L1 (beta 1/9) on the positives,
        both averaged over the sampled anchors (Ren et al., 2015, Eq. 1)."""
        labels, gt_deltas = [], []
        for target in targets:
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:  # an empty image: every anchor is a negative
                labels.append(torch.zeros(len(anchors), device=anchors.device))
                gt_deltas.append(torch.zeros_like(anchors))
                continue
            matches = self.matcher(box_iou(gt_boxes, anchors))
            labels_i = (matches >= 0).to(torch.float32)
            labels_i[matches == Matcher.BETWEEN] = -1.0
            labels.append(labels_i)
            gt_deltas.append(self.box_coder.encode(gt_boxes[matches.clamp(min=0)], anchors))
        pos, neg = self.sampler(labels)
        num_anchors = len(anchors)
        # per-image indices -> indices into the (N*P,) flattened batch
        pos = torch.cat([p + i * num_anchors for i, p in enumerate(pos)])
        neg = torch.cat([n + i * num_anchors for i, n in enumerate(neg)])
        sampled = torch.cat([pos, neg])
        labels, gt_deltas = torch.cat(labels), torch.cat(gt_deltas)
        box_loss = F.smooth_l1_loss(pred_deltas.reshape(-1, 4)[pos], gt_deltas[pos], beta=1 / 9,
                                    reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.reshape(-1)[sampled], labels[sampled])
        return {"rpn_objectness": objectness_loss, "rpn_box": box_loss}


# =============================================================================================
# 04 roi heads: RoIAlign, level mapping, box head, predictor, RoI sampling and loss, FasterRCNN
# =============================================================================================
# roi_align, boxes_to_rois — RoIAlign, one RoI at a time (the fast one: Appendix)
# MultiScaleRoIAlign — RoIAlign from the level that suits each RoI (map_levels)
# TwoMLPHead, FastRCNNPredictor — box head and predictor
# RoIHeads — RoI sampling and loss when training, detections when not
# DetectionTransform, resize_boxes — normalise, resize, pad; boxes back to input pixels
# FasterRCNN — the whole detector; load_torchvision_state_dict; eval runs a folded backbone
# check_targets — training targets refused with a clear message when malformed
"""Section 04. The second stage (Girshick, 2015; Ren et al., 2015, Sec. 3.2) crops a fixed
7x7 grid of features for each proposal with RoIAlign (He et al., 2017, Sec. 3), from the
pyramid level that suits its size (Lin et al., 2017, Eq. 1), and classifies and refines it.

    rois           (R, 5)  (image index, x1, y1, x2, y2)
    roi_features   (R, C, 7, 7) -> box head -> (R, 1024)
    class_logits   (R, K)        box_deltas (R, K*4), one box per class
    detections     per image: boxes (D, 4), scores (D,), labels (D,), D <= 100
"""


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """Per-image boxes [(R_i, 4)] -> (sum R_i, 5) rows of (image index, x1, y1, x2, y2)."""
    idx = torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)])
    return torch.cat([idx, torch.cat(boxes)], dim=1)


def _bilinear_taps(coord: Tensor, size: int):
    """For sample coordinates along one axis (pixel i sits at coordinate i), the two pixels
    each sample reads and their weights, with RoIAlign's border rules: a sample more than
    one pixel outside the map reads 0; one within a pixel of the border reads the border."""
    valid = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0)
    low = coord.to(torch.int64)                        # floor, coord >= 0
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    coord = torch.where(at_end, low.to(coord.dtype), coord)
    frac = coord - low
    return low, high, (1 - frac) * valid, frac * valid  # weights are 0 for invalid samples


def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign (He et al., 2017, Sec. 3), with torchvision.ops.roi_align's semantics.

    input (N, C, H, W); boxes (R, 5) rows (image index, x1, y1, x2, y2) or a list of (R_i, 4)
    per image, in input-image pixels; spatial_scale maps them to this map (1/stride).
    Each of the output_size bins averages sampling_ratio x sampling_ratio bilinear samples at
    the centres of a regular sub-grid (adaptive, ceil(bin size) per side, when <= 0).
    aligned=True shifts boxes by half a pixel so that a box's corner sits on a pixel's
    corner, not its centre; aligned=False (the Faster R-CNN default) also makes every RoI at
    least 1x1. Returns (R, C, out_h, out_w).

    This is the version to read: one RoI at a time. The model runs roi_align_fast (Appendix:
    speed and parity), which computes the same numbers for all RoIs at once.
    """
    rois = boxes_to_rois(boxes) if isinstance(boxes, (list, tuple)) else boxes
    out_h, out_w = _pair(output_size)
    c, height, width = input.shape[1:]
    # the geometry in at least float32: half precision cannot place a sample within a pixel
    rois = rois.to(torch.promote_types(input.dtype, torch.float32))
    offset = 0.5 if aligned else 0.0
    outputs = []
    for roi in rois:
        x1, y1, x2, y2 = roi[1:] * spatial_scale - offset       # the box on this map
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
        bin_w, bin_h = roi_w / out_w, roi_h / out_h
        # samples per bin along each axis: fixed, or enough for about one per pixel
        gh = sampling_ratio if sampling_ratio > 0 else max(int(torch.ceil(roi_h / out_h)), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(int(torch.ceil(roi_w / out_w)), 0)
        if gh == 0 or gw == 0:  # an empty RoI (aligned=True, zero size) averages nothing: 0
            outputs.append(input.new_zeros((c, out_h, out_w)))
            continue
        # sample coordinates: bin start + (i + 0.5) * bin / g, (out_h*gh,) and (out_w*gw,)
        iy, ix = torch.arange(out_h * gh, device=rois.device), torch.arange(out_w * gw, device=rois.device)
        ys = (y1 + (iy // gh) * bin_h) + ((iy % gh) + 0.5) * bin_h / gh
        xs = (x1 + (ix // gw) * bin_w) + ((ix % gw) + 0.5) * bin_w / gw
        y_lo, y_hi, wy_lo, wy_hi = _bilinear_taps(ys, height)
        x_lo, x_hi, wx_lo, wx_hi = _bilinear_taps(xs, width)
        feature = input[int(roi[0])]                             # (C, H, W)
        # bilinear interpolation at every sample: its four pixels, weighted, (C, SY, SX)
        samples = (feature[:, y_lo][:, :, x_lo] * (wy_lo[:, None] * wx_lo[None, :])
                   + feature[:, y_lo][:, :, x_hi] * (wy_lo[:, None] * wx_hi[None, :])
                   + feature[:, y_hi][:, :, x_lo] * (wy_hi[:, None] * wx_lo[None, :])
                   + feature[:, y_hi][:, :, x_hi] * (wy_hi[:, None] * wx_hi[None, :]))
        # each bin averages its gh x gw samples: (C, out_h*gh, out_w*gw) -> (C, out_h, out_w)
        outputs.append(samples.reshape(c, out_h, gh, out_w, gw).mean(dim=(2, 4)).to(input.dtype))
    if not outputs:
        return input.new_zeros((0, c, out_h, out_w))
    return torch.stack(outputs)


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign from the pyramid level that suits each RoI's size (Lin et al., 2017, Eq. 1):

        k = floor(k0 + log2(sqrt(w * h) / 224)),  clamped to the levels at hand

    k0 = 4 and 224 because a 224x224 box is an ImageNet-sized object, which a ResNet sees
    best at C4's stride (16); each halving of the box moves it one level finer. Both are
    settings (TrainConfig.roi_canonical_size, roi_canonical_level): on smaller images most RoIs
    pool from P2, which a smaller canonical size would spread out (the `cpu` profile measured
    both and kept 224: bench/level_mapper.json).
    """

    def __init__(self, *, output_size: int = 7, sampling_ratio: int = 2, canonical_size: int = 224,
                 canonical_level: int = 4):
        super().__init__()
        self.output_size, self.sampling_ratio = output_size, sampling_ratio
        self.canonical_size, self.canonical_level = canonical_size, canonical_level

    @staticmethod
    def level_scales(features, image_sizes) -> list[float]:
        """1/stride of each level, a power of two, from the largest image's size (not the
        padded one) over the level's size, rounded in log2."""
        max_h = max(h for h, _ in image_sizes)
        return [2.0 ** round(math.log2(f.shape[-2] / max_h)) for f in features]

    def map_levels(self, boxes: Tensor, k_min: int, k_max: int) -> Tensor:
        """(R, 4) -> pyramid level index (R,) in 0..k_max-k_min. The 1e-6 keeps a box of exactly
        224 px on level 4 despite log2 rounding."""
        size = torch.sqrt(box_area(boxes))
        k = torch.floor(self.canonical_level + torch.log2(size / self.canonical_size) + 1e-6)
        return k.clamp(min=k_min, max=k_max).to(torch.int64) - k_min

    def forward(self, features, proposals: list[Tensor], image_sizes) -> Tensor:
        """features P2..P5, proposals per image (R_i, 4) -> (sum R_i, C, 7, 7)."""
        scales = self.level_scales(features, image_sizes)
        k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
        rois = boxes_to_rois(proposals)
        levels = self.map_levels(rois[:, 1:], k_min, k_max)
        c, (out_h, out_w) = features[0].shape[1], _pair(self.output_size)
        out = features[0].new_empty((len(rois), c, out_h, out_w))  # every RoI has a level: all written
        for level, (feature, scale) in enumerate(zip(features, scales)):
            level_idx = torch.where(levels == level)[0]
            # roi_align's numbers, all RoIs at once (Appendix), written straight into their rows of `out`
            roi_align_fast(feature, rois[level_idx], (out_h, out_w), scale, self.sampling_ratio,
                           out=out, out_rows=level_idx)
        return out


class TwoMLPHead(nn.Module):
    """(R, C, 7, 7) -> flatten -> fc6 -> ReLU -> fc7 -> ReLU -> (R, 1024)  (Lin et al., 2017, Sec. 4.2)."""

    def __init__(self, in_features: int, hidden: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_features, hidden)
        self.fc7 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(start_dim=1)))))


class FastRCNNPredictor(nn.Module):
    """(R, 1024) -> class_logits (R, K) and box_deltas (R, K*4): a box for every class."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Second stage: RoI sampling and loss when training, detections when not.
    Settings are plain numbers, all keyword-only; their defaults live in FasterRCNN."""

    def __init__(self, box_roi_pool: MultiScaleRoIAlign, box_head: nn.Module, box_predictor: nn.Module, *,
                 fg_iou_thresh: float, bg_iou_thresh: float, batch_size_per_image: int,
                 positive_fraction: float, bbox_reg_weights, score_thresh: float, nms_thresh: float,
                 detections_per_img: int):
        super().__init__()
        self.box_roi_pool, self.box_head, self.box_predictor = box_roi_pool, box_head, box_predictor
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        # The share of ground-truth boxes among the positive RoIs of the last training step, for the
        # training log (train_one_epoch): near 1 while the RPN proposes nothing on the objects;
        # -1 when a step has no positive RoI at all.
        self.gt_share = -1.0

    def forward(self, features, proposals: list[Tensor], image_sizes, targets=None):
        if self.training:
            proposals, labels, gt_deltas = self.sample_rois(proposals, targets)
        roi_features = self.box_head(self.box_roi_pool(features, proposals, image_sizes))  # (R, 1024)
        class_logits, box_deltas = self.box_predictor(roi_features)                    # (R, K), (R, K*4)
        if self.training:
            return [], self.loss(class_logits, box_deltas, labels, gt_deltas)
        return self.postprocess(class_logits, box_deltas, proposals, image_sizes), {}

    def sample_rois(self, proposals: list[Tensor], targets):
        """Label each proposal by its best GT (IoU >= 0.5 -> that GT's class, else background),
        sample 512 per image with at most a quarter positive, and encode their box targets."""
        all_labels, all_matched, joined = [], [], []
        num_proposals = [len(props) for props in proposals]    # rows after these are GT boxes
        for props, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"].to(props.dtype), target["labels"]
            # The GT boxes join the proposals: early in training the RPN proposes nothing
            # useful, and these guarantee every GT a perfect positive RoI.
            props = torch.cat([props, gt_boxes])
            if gt_boxes.numel() == 0:
                labels = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                matched = torch.zeros_like(props)
            else:
                matches = self.matcher(box_iou(gt_boxes, props))
                labels = gt_labels[matches.clamp(min=0)].to(torch.int64)
                labels[matches == Matcher.BELOW] = 0
                labels[matches == Matcher.BETWEEN] = -1
                matched = gt_boxes[matches.clamp(min=0)]
            joined.append(props)
            all_labels.append(labels)
            all_matched.append(matched)
        pos, neg = self.sampler(all_labels)
        num_pos = sum(len(p) for p in pos)
        num_gt_pos = sum(int((p >= n).sum()) for p, n in zip(pos, num_proposals))
        self.gt_share = num_gt_pos / num_pos if num_pos else -1.0
        rois, labels, matched = [], [], []
        for props, lab, mat, p, q in zip(joined, all_labels, all_matched, pos, neg):
            keep = torch.cat([p, q]).sort().values
            rois.append(props[keep])
            labels.append(lab[keep])
            matched.append(mat[keep])
        gt_deltas = self.box_coder.encode(torch.cat(matched), torch.cat(rois))
        return rois, torch.cat(labels), gt_deltas

    def loss(self, class_logits: Tensor, box_deltas: Tensor, labels: Tensor, gt_deltas: Tensor) -> dict:
        """Cross-entropy over K classes + smooth-L1 (beta 1/9) on the true class's box of each
        positive RoI, normalised by all sampled RoIs (Girshick, 2015, Eq. 1)."""
        classifier_loss = F.cross_entropy(class_logits, labels)
        pos = torch.where(labels > 0)[0]
        box_deltas = box_deltas.reshape(len(box_deltas), -1, 4)     # (R, K*4) -> (R, K, 4)
        box_loss = F.smooth_l1_loss(box_deltas[pos, labels[pos]], gt_deltas[pos], beta=1 / 9,
                                    reduction="sum") / labels.numel()
        return {"roi_classifier": classifier_loss, "roi_box": box_loss}

    def postprocess(self, class_logits: Tensor, box_deltas: Tensor, proposals: list[Tensor], image_sizes):
        """Per image: a box per class per RoI, scored by softmax; drop background, scores <=
        score_thresh and tiny boxes; NMS within each class; keep the best detections_per_img."""
        num_classes = class_logits.shape[-1]
        boxes = self.box_coder.decode(box_deltas, torch.cat(proposals))   # (R, K, 4)
        scores = F.softmax(class_logits, dim=-1)                            # (R, K)
        counts = [len(p) for p in proposals]
        detections = []
        for boxes_i, scores_i, size in zip(boxes.split(counts), scores.split(counts), image_sizes):
            boxes_i = clip_boxes_to_image(boxes_i, size)
            labels_i = torch.arange(num_classes, device=boxes_i.device).expand_as(scores_i)
            # drop the background column, then one row per (RoI, class): (R*(K-1), ...)
            boxes_i, scores_i = boxes_i[:, 1:].reshape(-1, 4), scores_i[:, 1:].reshape(-1)
            labels_i = labels_i[:, 1:].reshape(-1)
            keep = torch.where(scores_i > self.score_thresh)[0]
            keep = keep[remove_small_boxes(boxes_i[keep], 1e-2)]
            boxes_i, scores_i, labels_i = boxes_i[keep], scores_i[keep], labels_i[keep]
            keep = batched_nms(boxes_i, scores_i, labels_i, self.nms_thresh, max_keep=self.detections_per_img)
            detections.append({"boxes": boxes_i[keep], "scores": scores_i[keep], "labels": labels_i[keep]})
        return detections


class DetectionTransform(nn.Module):
    """Images in -> one normalised, resized, zero-padded batch; boxes follow the resize.

    Resize keeps the aspect ratio: the short side becomes min_size unless the long side
    would pass max_size (then the long side becomes max_size). Padding to a multiple of 32
    makes every pyramid level's size a whole number of the previous one's halves.
        images list of (3, H_i, W_i) -> batch (N, 3, H_pad, W_pad), image_sizes [(h_i, w_i)]
    """

    def __init__(self, *, min_size, max_size: int, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                 size_divisible: int = 32):
        super().__init__()
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (min_size,)
        self.max_size, self.size_divisible = max_size, size_divisible
        self.image_mean, self.image_std = image_mean, image_std

    def forward(self, images: list[Tensor], targets=None):
        out_images, out_targets = [], None if targets is None else []
        for i, image in enumerate(images):
            if image.dim() != 3 or not image.is_floating_point():
                raise ValueError(f"image {i}: expected a float tensor (3, H, W) in 0..1, "
                                 f"got {tuple(image.shape)} {image.dtype}")
            mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
            std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
            image = (image - mean[:, None, None]) / std[:, None, None]
            resized = self.resize(image)
            out_images.append(resized)
            if targets is not None:
                target = dict(targets[i])  # never modify the caller's dict
                target["boxes"] = resize_boxes(target["boxes"], image.shape[-2:], resized.shape[-2:])
                if "area" in target:  # an area scales with both sides
                    target["area"] = target["area"] * (resized.shape[-2] * resized.shape[-1]
                                                       / (image.shape[-2] * image.shape[-1]))
                out_targets.append(target)
        image_sizes = [tuple(img.shape[-2:]) for img in out_images]
        return self.batch(out_images), image_sizes, out_targets

    def resize(self, image: Tensor) -> Tensor:
        if self.training:  # multi-scale training picks a short side at random per image
            size = self.min_size[int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())]
        else:
            size = self.min_size[-1]
        h, w = image.shape[-2:]
        scale = min(size / min(h, w), self.max_size / max(h, w))
        return F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                             align_corners=False)[0]

    def batch(self, images: list[Tensor]) -> Tensor:
        stride = self.size_divisible
        max_h = int(math.ceil(max(img.shape[-2] for img in images) / stride) * stride)
        max_w = int(math.ceil(max(img.shape[-1] for img in images) / stride) * stride)
        batch = images[0].new_zeros((len(images), images[0].shape[0], max_h, max_w))
        for img, slot in zip(images, batch):
            slot[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        return batch

    def postprocess(self, detections: list[dict], image_sizes, original_sizes) -> list[dict]:
        """Boxes from the resized image back to the input image's pixels."""
        for det, size, original in zip(detections, image_sizes, original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], size, original)
        return detections


def resize_boxes(boxes: Tensor, old_size, new_size) -> Tensor:
    """Scale xyxy boxes from an image of old_size (H, W) to new_size (H, W)."""
    ratio_h = torch.tensor(new_size[0], dtype=torch.float32, device=boxes.device) / old_size[0]
    ratio_w = torch.tensor(new_size[1], dtype=torch.float32, device=boxes.device) / old_size[1]
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


class FasterRCNN(nn.Module):
    """Faster R-CNN with a ResNet-FPN backbone (Ren et al., 2015; Lin et al., 2017).

    Every default equals torchvision's fasterrcnn_resnet50_fpn (v1), so its weights load with
    load_torchvision_state_dict and give the same detections.

        model(images)            eval:  list of {"boxes" (D, 4), "scores" (D,), "labels" (D,)} in input pixels
        model(images, targets)   train: {"rpn_objectness", "rpn_box", "roi_classifier", "roi_box"}

    In eval mode the model runs, by default (fused_inference=True), a copy of its backbone with
    BatchNorm folded into the convolutions and channels_last weights (inference_backbone,
    Appendix: speed and parity): the same detections within 1e-2 px, faster. model.train()
    goes back to the backbone that trains; fused_inference=False runs it in eval mode too, in
    torchvision's order of arithmetic.
    """

    def __init__(self, num_classes: int = 91, *, backbone: BackboneWithFPN | None = None,
                 # transform: resize so the short side is min_size, the long side at most max_size
                 min_size=800, max_size: int = 1333, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                 # RPN: one anchor size per level (P2..P6), three aspect ratios
                 anchor_sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0),
                 rpn_pre_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 1000,
                 rpn_post_nms_top_n_train: int = 2000, rpn_post_nms_top_n_test: int = 1000,
                 rpn_nms_thresh: float = 0.7, rpn_fg_iou_thresh: float = 0.7, rpn_bg_iou_thresh: float = 0.3,
                 rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
                 rpn_score_thresh: float = 0.0,
                 # box head: 7x7 RoIAlign, two 1024-d FC layers, per-class boxes
                 representation_size: int = 1024,
                 # level mapper (Lin et al., 2017, Eq. 1): a box of roi_canonical_size px pools from
                 # P_roi_canonical_level, one level finer per halving
                 roi_canonical_size: int = 224, roi_canonical_level: int = 4,
                 box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5, box_detections_per_img: int = 100,
                 box_fg_iou_thresh: float = 0.5, box_bg_iou_thresh: float = 0.5,
                 box_batch_size_per_image: int = 512, box_positive_fraction: float = 0.25,
                 bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
                 # inference: run the folded, channels_last copy in eval mode (see above)
                 fused_inference: bool = True):
        super().__init__()
        self.fused_inference = fused_inference
        if backbone is None:
            backbone = resnet_fpn_backbone()
            backbone.body.freeze(3)  # as torchvision with pretrained weights: stem and layer1 frozen
        self.num_classes = num_classes
        self.transform = DetectionTransform(min_size=min_size, max_size=max_size, image_mean=image_mean,
                                            image_std=image_std)
        self.backbone = backbone
        channels = backbone.out_channels
        anchors = AnchorGenerator(anchor_sizes, aspect_ratios)
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(channels, anchors.num_anchors_per_location),
            fg_iou_thresh=rpn_fg_iou_thresh, bg_iou_thresh=rpn_bg_iou_thresh,
            batch_size_per_image=rpn_batch_size_per_image, positive_fraction=rpn_positive_fraction,
            pre_nms_top_n_train=rpn_pre_nms_top_n_train, pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            post_nms_top_n_train=rpn_post_nms_top_n_train, post_nms_top_n_test=rpn_post_nms_top_n_test,
            nms_thresh=rpn_nms_thresh, score_thresh=rpn_score_thresh)
        roi_pool = MultiScaleRoIAlign(output_size=7, sampling_ratio=2, canonical_size=roi_canonical_size,
                                      canonical_level=roi_canonical_level)
        self.roi_heads = RoIHeads(
            roi_pool, TwoMLPHead(channels * 7 * 7, representation_size),
            FastRCNNPredictor(representation_size, num_classes),
            fg_iou_thresh=box_fg_iou_thresh, bg_iou_thresh=box_bg_iou_thresh,
            batch_size_per_image=box_batch_size_per_image, positive_fraction=box_positive_fraction,
            bbox_reg_weights=bbox_reg_weights, score_thresh=box_score_thresh, nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img)

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        if self.training:
            check_targets(images, targets)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, image_sizes, targets = self.transform(images, targets)          # (N, 3, H, W)
        # in eval mode, by default, the same backbone with BatchNorm folded, channels_last (Appendix)
        backbone = inference_backbone(self) if not self.training and self.fused_inference else self.backbone
        features = backbone(batch)                                              # P2..P6
        proposals, _, rpn_losses = self.rpn(batch.shape[-2:], image_sizes, features, targets)
        detections, roi_losses = self.roi_heads(features[:4], proposals, image_sizes, targets)  # P2..P5
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.transform.postprocess(detections, image_sizes, original_sizes)

    def fuse(self) -> "FasterRCNN":
        """A new, independent inference copy of this model (fused_copy: BatchNorm folded,
        channels_last, eval mode, no gradients); this model is left as it is. Nothing to call
        for speed: model.eval() already runs a folded backbone."""
        return fused_copy(self)

    def train(self, mode: bool = True) -> "FasterRCNN":
        """Training or eval mode (eval() calls this too). Either way the cached inference backbone
        is dropped: eval mode builds a fresh one on its first forward."""
        self.__dict__.pop("_inference_backbone", None)
        return super().train(mode)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the cached inference backbone behind."""
        state = self.__dict__.copy()
        state.pop("_inference_backbone", None)
        return state

    def load_torchvision_state_dict(self, state_dict: dict) -> "FasterRCNN":
        """Load torchvision's fasterrcnn_resnet50_fpn weights (strictly: every key used)."""
        self.load_state_dict(self.from_torchvision_keys(state_dict), strict=True)
        return self

    def from_torchvision_keys(self, state_dict: dict) -> dict:
        """torchvision's fasterrcnn_resnet50_fpn state dict with this model's key names."""
        renames = (("backbone.fpn.inner_blocks.", "backbone.fpn.lateral."),
                   ("backbone.fpn.layer_blocks.", "backbone.fpn.output."),
                   ("rpn.head.conv.0.0.", "rpn.head.conv."))
        converted = {}
        for key, value in state_dict.items():
            for old, new in renames:
                if key.startswith(old):
                    key = new + key[len(old):]
                    if old.startswith("backbone.fpn"):  # ...blocks.{i}.0.weight -> ...{i}.weight
                        i, _, rest = key[len(new):].split(".", 2)
                        key = f"{new}{i}.{rest}"
            if key.endswith("num_batches_tracked") and not any(
                    isinstance(m, nn.BatchNorm2d) for m in self.backbone.modules()):
                continue  # frozen BatchNorm keeps no step counter
            converted[key] = value
        return converted


def check_targets(images: list[Tensor], targets) -> None:
    """Training targets must be present and well formed; a degenerate box would give a NaN
    loss (log of a zero width), so it is refused here, by image, with a clear message."""
    if targets is None or len(targets) != len(images):
        raise ValueError("training needs one target dict per image")
    for i, target in enumerate(targets):
        boxes, labels = target.get("boxes"), target.get("labels")
        if boxes is None or labels is None:
            raise ValueError(f"target {i}: needs 'boxes' and 'labels'")
        if not boxes.is_floating_point() or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: boxes must be a float tensor (G, 4), got {tuple(boxes.shape)} {boxes.dtype}")
        if labels.dtype != torch.int64:
            raise ValueError(f"target {i}: labels must be int64, got {labels.dtype}")
        bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bad.any():
            raise ValueError(f"target {i}: boxes with zero or negative size at rows "
                             f"{torch.where(bad)[0].tolist()}: {boxes[bad].tolist()}")


# =============================================================================================
# 05 training: profiles, the model they build, the training loop, checkpoints, DDP
# =============================================================================================
# TrainConfig, PROFILES — every setting of a run; smoke, cpu, full
# make_datasets, subset — train and validation sets of a config
# build_model — the FasterRCNN a config describes
# trainable_targets — crowd regions and 'difficult' objects kept for evaluation, out of the loss
# train_one_epoch — the loop: forward, guard, backward, clip, step
# train, train_in_processes — the whole run (setup_run, epoch_loader, train_one_epoch,
#     end_epoch); the CPU launcher; TrainingProcessFailed — one of its processes ended early
# lr_factor, make_optimizer — schedule and optimiser
# init_from_checkpoint, freeze_backbone — transfer learning: train --init, --freeze-backbone-epochs
# load_checkpoint, save_checkpoint — a trained model back, in eval mode; atomic writes
# predict_dataset, evaluate_model — detections and COCO metrics over a dataset
# torchvision_detector_state_dict, COCO_CLASSES — torchvision's COCO weights and labels
"""Section 05. One commented dataclass holds every setting of a run; three profiles fill it:

    smoke   seconds on a CPU: for tests
    cpu     a narrow ResNet-FPN that trains a working detector on the embedded dataset on a
            2-core CPU in minutes
    full    ResNet50-FPN at 800/1333 on a GPU; COCO when present, else the embedded dataset

A checkpoint (last.pt, best.pt) holds the model, optimizer, scheduler, epoch, RNG states,
history and the TrainConfig that built the model, so `evaluate` and `predict` need nothing else.
"""


@dataclass
class TrainConfig:
    # --- data
    data: str = "shapes"             # "shapes" (embedded), "coco" or "voc"
    data_root: str = "data/shapes"   # relative paths resolve against the repository root
    num_train: int = 1000            # embedded dataset size (shapes only)
    num_val: int = 200
    # --- model: a ResNet-FPN of this depth and width (ResNet50-FPN: (3, 4, 6, 3), 64, 256)
    blocks: tuple = (3, 4, 6, 3)
    width: int = 64
    fpn_channels: int = 256
    representation_size: int = 1024  # box head's two FC layers
    norm: str = "frozen"             # "frozen" BatchNorm (pretrained backbone) or "batch" (from scratch)
    pretrained_backbone: bool = True # ImageNet ResNet50 weights when they can be had (ResNet50 only)
    trainable_backbone_layers: int = 3
    min_size: int = 800              # short side after resizing
    max_size: int = 1333
    anchor_sizes: tuple = (32, 64, 128, 256, 512)
    roi_canonical_size: int = 224    # the level mapper's s0 and k0: a RoI of s0 px pools from P_k0,
    roi_canonical_level: int = 4     # one level finer per halving (torchvision's 224, 4)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100
    # --- optimisation
    epochs: int = 12
    batch_size: int = 2              # images per process
    optimizer: str = "sgd"           # "sgd" (momentum 0.9) or "adamw"
    lr: float = 0.0025               # for one process's batch; SGD under DDP multiplies it by the
                                     # number of processes (0.02 for 8 x 2 images, as the references)
    weight_decay: float = 1e-4
    warmup_iters: int = 500          # linear warm-up from lr * 0.001
    schedule: str = "step"           # "step" (x0.1 at 2/3 and 8/9 of training) or "cosine"
    clip_grad_norm: float = 10.0     # 0 disables
    amp: bool = True                 # mixed precision (bf16) on CUDA; ignored on CPU
    channels_last: bool = True       # NHWC weights and feature maps: the layout the CPU's and the
                                     # GPU's convolution kernels run fastest (12% a step on 2 cores)
    # --- processes
    cpu_processes: int = 1           # on a CPU, train() without torchrun starts this many DDP
                                     # processes (at most one a core), each with its share of the
                                     # cores: a narrow network's small convolutions keep one core
                                     # busy better than two (1.6x the images/s of one process)
    # --- bookkeeping
    seed: int = 0
    num_workers: int | None = None   # None: make_data_loader's default
    max_train_images: int | None = None  # cap on the training images (smoke runs)
    max_val_images: int | None = None
    max_bad_steps: int = 5           # consecutive non-finite losses before the run stops


PROFILES = {
    "smoke": TrainConfig(data_root="data/shapes_smoke", num_train=40, num_val=10, blocks=(1, 1, 1, 1),
                         width=8, fpn_channels=32, representation_size=64, norm="batch",
                         pretrained_backbone=False, trainable_backbone_layers=5, min_size=160,
                         max_size=256, anchor_sizes=(16, 32, 64, 128, 256), rpn_pre_nms_top_n_train=300,
                         rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=300,
                         rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, epochs=2,
                         batch_size=4, optimizer="adamw", lr=2e-3, weight_decay=1e-4, warmup_iters=5,
                         schedule="cosine", amp=False, max_train_images=16, max_val_images=8),
    # cpu keeps the level mapper's canonical size 224 though its anchors are halved: scaled with
    # them (112), it trained worse (bench/level_mapper.json, which notebook 04 prints)
    "cpu": TrainConfig(blocks=(1, 1, 2, 1), width=16, fpn_channels=64, representation_size=256,
                       norm="batch", pretrained_backbone=False, trainable_backbone_layers=5,
                       min_size=256, max_size=400, anchor_sizes=(16, 32, 64, 128, 256), roi_canonical_size=224,
                       rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
                       rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300,
                       box_batch_size_per_image=128, epochs=10, batch_size=2, cpu_processes=2,
                       optimizer="adamw", lr=2e-3, weight_decay=1e-4, warmup_iters=200,
                       schedule="cosine", amp=False),
    "full": TrainConfig(),
}


def build_model(cfg: TrainConfig, num_classes: int) -> "FasterRCNN":
    """The FasterRCNN that a TrainConfig describes (num_classes includes background)."""
    norm_layer = FrozenBatchNorm2d if cfg.norm == "frozen" else nn.BatchNorm2d
    backbone = resnet_fpn_backbone(blocks=tuple(cfg.blocks), width=cfg.width, fpn_channels=cfg.fpn_channels,
                                   norm_layer=norm_layer)
    backbone.body.freeze(cfg.trainable_backbone_layers)
    return FasterRCNN(num_classes, backbone=backbone, min_size=cfg.min_size, max_size=cfg.max_size,
                      anchor_sizes=tuple(cfg.anchor_sizes), representation_size=cfg.representation_size,
                      roi_canonical_size=cfg.roi_canonical_size, roi_canonical_level=cfg.roi_canonical_level,
                      rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
                      rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
                      rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
                      rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
                      box_batch_size_per_image=cfg.box_batch_size_per_image,
                      box_detections_per_img=cfg.box_detections_per_img)


def torchvision_detector_state_dict(path: str | os.PathLike | None = None) -> dict | None:
    """torchvision's COCO-trained fasterrcnn_resnet50_fpn weights (COCO_V1), or None: see
    torchvision_weights."""
    return torchvision_weights("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", path)


COCO_CLASSES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella",
    "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # the 91 labels of torchvision's COCO-trained detectors (category ids; "N/A" ids are unused)


def resolve(path) -> pathlib.Path:
    """Relative paths (data/..., runs/...) are relative to the repository root, wherever the caller
    runs from, or to the folder that the environment variable FRCNN_WORKSPACE names: the tests
    and tools/run_notebooks.py --workspace send the datasets and runs there, leaving the checkout
    as it was."""
    path = pathlib.Path(path)
    return path if path.is_absolute() else pathlib.Path(os.environ.get("FRCNN_WORKSPACE") or ROOT) / path


def make_datasets(cfg: TrainConfig, *, data_root=None, quiet=False):
    """(train set with flips, validation set) for cfg.data; the embedded set is built on first use
    (quiet=True: no message when it is reused); "coco" and "voc" read any folder that
    own_datasets reads (COCO 2017 and Pascal VOC included)."""
    root = resolve(data_root or cfg.data_root)
    if cfg.data == "shapes":
        root = build_shapes_dataset(root, num_train=cfg.num_train, num_val=cfg.num_val, quiet=quiet)
        train = CocoDetection(root / "train", root / "annotations" / "instances_train.json",
                              transforms=RandomHorizontalFlip(0.5))
        val = CocoDetection(root / "val", root / "annotations" / "instances_val.json")
    elif cfg.data in ("coco", "voc"):   # COCO 2017, VOC, or your own folder in either format
        train, val = own_datasets(cfg.data, root, seed=cfg.seed, quiet=quiet)
    else:
        raise ValueError(f"unknown data {cfg.data!r}: expected 'shapes', 'coco' or 'voc'")
    return train, val


def subset(dataset, limit: int | None):
    """The first `limit` items of a dataset (all when None), keeping what describes its classes
    and files (class_names, label_to_cat_id, ...) so evaluation and export still work."""
    if limit is None or limit >= len(dataset):
        return dataset
    part = torch.utils.data.Subset(dataset, range(limit))
    for name in ("class_names", "num_classes", "label_to_cat_id", "cat_id_to_label", "ann_file", "image_dir"):
        if hasattr(dataset, name):
            setattr(part, name, getattr(dataset, name))
    return part


def trainable_targets(targets: list[dict]) -> list[dict]:
    """Crowd regions and VOC 'difficult' objects are kept for evaluation (which ignores
    detections on them), but training drops them, as torchvision's and Detectron2's references
    do: anchors and RoIs on a crowd are matched against the other objects only (usually
    background). The loss sees boxes and labels; 'area' (evaluation's) stays behind."""
    out = []
    for t in targets:
        keep = ~t["iscrowd"].bool() if "iscrowd" in t else torch.ones(len(t["boxes"]), dtype=torch.bool)
        out.append({"boxes": t["boxes"][keep], "labels": t["labels"][keep]})
    return out


def lr_factor(cfg: TrainConfig, it: int, total: int) -> float:
    """Learning-rate multiplier at iteration `it` of `total`: linear warm-up from 0.001,
    then cosine decay to 0, or steps of x0.1 at 2/3 and 8/9 of training."""
    warmup = min(cfg.warmup_iters, max(total - 1, 1))
    if it < warmup:
        return 0.001 + (1 - 0.001) * it / warmup
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(total - warmup, 1)))
    return 0.1 ** sum(it >= m for m in (total * 2 // 3, total * 8 // 9))


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (the references' choice with a pretrained backbone) or AdamW (which
    trains a from-scratch network faster). No weight decay on norms and biases: shrinking
    them towards 0 does not regularise anything."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: expected 'sgd' or 'adamw'")


def save_checkpoint(obj: dict, path) -> None:
    """torch.save through write_atomic: a kill mid-write never leaves a broken checkpoint."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path, device="cpu"):
    """(model in eval mode, checkpoint dict) from a file that train wrote. In eval mode the model
    runs a folded, channels_last backbone (FasterRCNN, inference_backbone): nothing to call for speed."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        cfg = TrainConfig(**ckpt["config"])
        model = build_model(cfg, len(ckpt["class_names"]))
        model.load_state_dict(ckpt["model"])
    except Exception as err:  # unpickling errors come in many types; all mean the same here
        raise ValueError(f"checkpoint {path} is not a frcnn_common checkpoint or is damaged: "
                         f"{type(err).__name__}: {err}") from err
    return model.to(device).eval(), ckpt


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_states(world: int) -> list[dict]:
    """Every process's random state, in rank order (all processes call it together): each rank
    draws its own RPN and RoI samples, so an exact resume gives each its own state back."""
    if world == 1:
        return [_rng_state()]
    states = [None] * world
    dist.all_gather_object(states, _rng_state())
    return states


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group (nccl for CUDA, gloo for the CPU) when
    launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


class TrainingDiverged(RuntimeError):
    """Raised after cfg.max_bad_steps non-finite losses in a row."""


@torch.inference_mode()
def predict_dataset(model: nn.Module, dataset, *, device, batch_size: int = 4, progress: bool = True,
                    desc: str = "evaluate"):
    """Run the model over a dataset in eval mode (a FasterRCNN then runs its folded,
    channels_last backbone): (predictions, targets), both lists of dicts on the CPU."""
    model.eval()
    loader = make_data_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    predictions, targets = [], []
    for images, batch_targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        outputs = model([img.to(device) for img in images])
        predictions += [{k: v.cpu() for k, v in out.items()} for out in outputs]
        targets += batch_targets
    return predictions, targets


def evaluate_model(model: nn.Module, dataset, *, device, batch_size: int = 4, progress: bool = True,
                   return_predictions: bool = False) -> dict:
    """COCO metrics (pycocotools) of the model on a dataset, plus "images" and "seconds";
    return_predictions adds "predictions" and "targets" (for error_analysis, section 08)."""
    start = time.perf_counter()
    predictions, targets = predict_dataset(model, dataset, device=device, batch_size=batch_size,
                                           progress=progress)
    metrics = coco_evaluate(predictions, targets, class_names=dataset.class_names)
    metrics["seconds"] = time.perf_counter() - start
    if return_predictions:
        metrics["predictions"], metrics["targets"] = predictions, targets
    return metrics


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, *, device,
                    history: dict, clip_grad_norm: float = 0.0, max_bad_steps: int = 5, amp: bool = False,
                    world: int = 1, desc: str = "epoch", progress: bool = True, bad_steps: int = 0) -> int:
    """One pass over the loader, one optimiser step a batch; each step's losses and learning rate
    are appended to `history`. The whole loop of the lesson: forward, guard, backward, clip, step.
    Returns the non-finite steps in a row at its end; `bad_steps` carries the previous epoch's in,
    so that a run of them stops training however few steps an epoch has."""
    model.train()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for images, targets in bar:
        images = [img.to(device, non_blocking=True) for img in images]      # N x (3, H_i, W_i)
        ids = [t["image_id"] for t in targets]
        targets = [{k: v.to(device) for k, v in t.items()} for t in trainable_targets(targets)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):   # bf16 on a GPU only
            losses = model(images, targets)                   # the four named losses (Ren et al., Eq. 1)
        loss = sum(losses.values())

        # A non-finite loss would poison every weight through the optimiser's state: skip the step
        # (on every process together, so DDP's processes stay in step), and stop after a run of them.
        finite = torch.isfinite(loss).to(torch.float32)
        if world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 0:
            bad_steps += 1
            if world == 1 or dist.get_rank() == 0:
                print(f"non-finite loss at step {len(history['step'])} (images {ids}): step skipped")
            optimizer.zero_grad(set_to_none=True)
            if bad_steps >= max_bad_steps:
                raise TrainingDiverged(f"{bad_steps} non-finite losses in a row")
            continue
        bad_steps = 0

        optimizer.zero_grad(set_to_none=True)
        loss.backward()                                       # DDP averages the gradients here
        if clip_grad_norm > 0:                                # cap the rare huge step, keep its direction
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        history["step"].append(len(history["step"]))
        history["lr"].append(optimizer.param_groups[0]["lr"])
        scheduler.step()                                      # the schedule counts steps, not epochs
        for name, value in losses.items():
            history[name].append(value.item())
        history["loss"].append(loss.item())
        heads = getattr(model, "module", model).roi_heads     # DDP wraps the model in .module
        if hasattr(heads, "gt_share"):                        # ours; a torchvision model does not say
            history.setdefault("gt_share", []).append(heads.gt_share)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{history['lr'][-1]:.2e}")
    return bad_steps


@dataclass
class TrainingRun:
    """Everything train() carries from one epoch to the next, and what a checkpoint restores."""
    cfg: TrainConfig
    model: nn.Module                 # the model itself (checkpoints, evaluation)
    net: nn.Module                   # what the loop calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    class_names: list
    out_dir: pathlib.Path
    device: torch.device
    rank: int = 0
    world: int = 1
    total_steps: int = 0
    history: dict = field(default_factory=lambda: {k: [] for k in (
        "step", "lr", "rpn_objectness", "rpn_box", "roi_classifier", "roi_box", "loss")})
    epochs: list = field(default_factory=list)   # per-epoch validation metrics
    best_ap: float = -1.0
    epoch: int = 0                               # epochs finished
    train_seconds: float = 0.0

    def summary(self) -> dict:
        """What metrics.json holds, and train() returns."""
        return {"config": asdict(self.cfg), "class_names": self.class_names, "epochs": self.epochs,
                "history": self.history, "best_ap": self.best_ap, "train_seconds": self.train_seconds,
                "processes": self.world, "total_steps": self.total_steps}


def setup_run(cfg: TrainConfig, *, out_dir, resume: bool, device, data_root=None,
              model: nn.Module | None = None, init=None, progress: bool = True) -> TrainingRun:
    """The datasets (your own checked first: check_before_training), the model (ImageNet weights
    where the profile asks, or a trained model's with init: init_from_checkpoint), the optimiser
    and its schedule, DDP when this process is one of several; the state of last.pt when resuming."""
    rank, world = _distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.data in ("coco", "voc"):   # every process checks (and stops) alike; rank 0 prints the report
        check_before_training(cfg.data, resolve(data_root or cfg.data_root), cfg, verbose=rank == 0,
                              progress=progress)
    seed_everything(cfg.seed + rank)
    # The dataset is built (when missing) by rank 0 only; the others wait for it, then read it quietly.
    if rank == 0:
        train_set, val_set = make_datasets(cfg, data_root=data_root)
    if world > 1:
        dist.barrier()
    if rank != 0:
        train_set, val_set = make_datasets(cfg, data_root=data_root, quiet=True)
    train_set, val_set = subset(train_set, cfg.max_train_images), subset(val_set, cfg.max_val_images)
    class_names = list(train_set.class_names)

    last = resolve(out_dir) / "last.pt"
    resuming = resume and last.is_file()
    if model is None:   # a model passed in is used as it is; only our own gets ImageNet weights
        model, cfg = _build_with_backbone_weights(cfg, len(class_names), load=not (resuming or init),
                                                  verbose=rank == 0)
    if init and not resuming:
        init_from_checkpoint(model, init, class_names, verbose=rank == 0)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    if cfg.optimizer == "sgd" and world > 1:  # the linear scaling rule (Goyal et al., 2017)
        cfg = replace(cfg, lr=cfg.lr * world)
    optimizer = make_optimizer(cfg, model)
    steps_per_epoch = len(train_set) // (cfg.batch_size * world)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size * world}")
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it, total_steps))
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    run = TrainingRun(cfg, model, net, optimizer, scheduler, train_set, val_set, class_names, resolve(out_dir),
                      device, rank, world, total_steps)
    if resuming:
        _restore(run, torch.load(last, map_location="cpu", weights_only=False))
        if rank == 0:
            print(f"resumed from {last} after epoch {run.epoch}")
    elif resume and rank == 0:
        print(f"no checkpoint at {last}: starting from scratch")
    return run


def _build_with_backbone_weights(cfg: TrainConfig, num_classes: int, *, load: bool, verbose: bool):
    """(model, cfg): the profile's model, with ImageNet weights in its ResNet50 when the profile
    asks for them and they can be had. Without them, frozen statistics of a random network would
    be meaningless: the whole backbone trains, with BatchNorm (cfg says so)."""
    model = build_model(cfg, num_classes)
    if not (cfg.pretrained_backbone and tuple(cfg.blocks) == (3, 4, 6, 3) and cfg.width == 64 and load):
        return model, cfg
    weights = imagenet_resnet50_state_dict()
    if weights is not None:
        model.backbone.body.load_torchvision_state_dict(weights)
        model.backbone.body.freeze(cfg.trainable_backbone_layers)
        return model, cfg
    cfg = replace(cfg, norm="batch", trainable_backbone_layers=5, pretrained_backbone=False)
    if verbose:
        print("training the backbone from scratch, with trainable BatchNorm")
    return build_model(cfg, num_classes), cfg


def _restore(run: TrainingRun, ckpt: dict) -> None:
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.history, run.epochs, run.best_ap = ckpt["history"], ckpt["epochs"], ckpt["best_ap"]
    run.epoch, run.train_seconds = ckpt["epoch"], ckpt.get("train_seconds", 0.0)
    states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]   # one dict: older checkpoints
    # A run resumed with more processes than it saved cannot be exact: the extra ranks reuse the last state.
    _set_rng_state(states[min(run.rank, len(states) - 1)])


PREDICTOR = "roi_heads.box_predictor."   # the only weights that depend on the classes


def init_from_checkpoint(model: nn.Module, source, class_names, *, verbose: bool = True) -> nn.Module:
    """Transfer learning: load a trained detector's weights into `model` (in place; returned).

    source: a checkpoint that train wrote, a file of torchvision's fasterrcnn_resnet50_fpn state
    dict, or "torchvision" for torchvision's COCO weights (downloaded, when that is possible).
    Every weight is loaded; when the classes differ (the source's class_names, COCO_CLASSES for
    torchvision's, against `class_names`), the box predictor keeps its fresh random weights (its
    outputs are one per class). Any other weight that is missing or of another shape is an error
    naming it: the source must be a model of the same architecture (the same profile).
    """
    where = f"--init {source}"
    if str(source) == "torchvision":
        state = torchvision_detector_state_dict()
        if state is None:
            raise ValueError(f"{where}: torchvision's COCO weights cannot be had here (no download); "
                             "pass the path of a local copy of the .pth file instead")
        state, source_classes = model.from_torchvision_keys(state), COCO_CLASSES
    else:
        path = pathlib.Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: no such file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # unpickling errors come in many types; all mean the same here
            raise ValueError(f"{where}: not a checkpoint ({type(err).__name__}: {err})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{where}: not a checkpoint (a {type(state).__name__}, not a dict)")
        if "model" in state and "class_names" in state:                 # one of ours
            state, source_classes = state["model"], tuple(state["class_names"])
        else:                                                           # torchvision's state dict
            state = model.from_torchvision_keys(state)
            source_classes = COCO_CLASSES if len(state.get(PREDICTOR + "cls_score.weight", ())) == 91 else None
    same_classes = source_classes is not None and tuple(source_classes) == tuple(class_names)
    merged, misfits = {}, []
    for key, value in model.state_dict().items():
        if key.startswith(PREDICTOR) and not same_classes:
            merged[key] = value                                         # fresh: one output per new class
        elif key in state and state[key].shape == value.shape:
            merged[key] = state[key]
        else:
            misfits.append(f"{key} {tuple(value.shape)} vs {tuple(state[key].shape) if key in state else 'missing'}")
    if misfits:
        raise ValueError(f"{where}: {len(misfits)} weights do not fit this model (the first: {misfits[0]}); "
                         "--init needs a model of the same architecture (profile)")
    model.load_state_dict(merged)
    if verbose:
        kept = len(merged) - (0 if same_classes else sum(k.startswith(PREDICTOR) for k in merged))
        change = ("same classes" if same_classes else
                  f"classes differ ({len(source_classes or ()) - 1 if source_classes else '?'} -> "
                  f"{len(class_names) - 1}): the box predictor starts afresh")
        print(f"{where}: {kept} of {len(merged)} weights loaded, {change}")
    return model


def freeze_backbone(run: TrainingRun, frozen: bool) -> None:
    """Freeze the backbone (ResNet + FPN: no gradients, no updates) or give back the profile's
    trainable layers; under DDP the wrapper is rebuilt, since it registers the trainable
    parameters when it is made. BatchNorm's running statistics still follow the new data."""
    if frozen == (not any(p.requires_grad for p in run.model.backbone.parameters())):
        return
    run.model.backbone.requires_grad_(not frozen)
    if not frozen:
        run.model.backbone.body.freeze(run.cfg.trainable_backbone_layers)
    if run.world > 1:
        run.net = nn.parallel.DistributedDataParallel(run.model)
    if run.rank == 0:
        print(f"epoch {run.epoch + 1}: backbone {'frozen' if frozen else 'trainable again'}")


def epoch_loader(run: TrainingRun, epoch: int):
    """The epoch's batches: a new loader seeded by the epoch, so a resumed run sees the same order;
    under DDP each process gets its own share of the images."""
    sampler = None
    if run.world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(run.train_set, shuffle=True, seed=run.cfg.seed,
                                                                  drop_last=True)
        sampler.set_epoch(epoch)
    return make_data_loader(run.train_set, batch_size=run.cfg.batch_size, shuffle=True, sampler=sampler,
                            num_workers=run.cfg.num_workers, seed=run.cfg.seed + epoch, drop_last=True)


def end_epoch(run: TrainingRun, *, progress: bool) -> None:
    """Validation AP, then last.pt (and best.pt when the AP is the best so far) and metrics.json.
    Every process calls it: rank 0 evaluates and writes, and the checkpoint holds every process's
    random state (_rng_states), taken after the evaluation, which a resumed run gives back to each."""
    if run.rank == 0:
        metrics = evaluate_model(run.model, run.val_set, device=run.device, progress=progress)
    rng = _rng_states(run.world)
    if run.rank != 0:
        return
    run.epochs.append({"epoch": run.epoch, **{k: metrics[k] for k in COCO_METRIC_KEYS},
                       "train_seconds": run.train_seconds})
    if isinstance(run.model, FasterRCNN):  # the dashboard of section 08 (not for a torchvision model)
        steps = run.total_steps // run.cfg.epochs
        run.epochs[-1]["train_losses"] = {k: float(np.mean(run.history[k][-steps:])) for k in LOSS_NAMES}
        run.epochs[-1].update(epoch_dashboard(run.model, subset(run.val_set, DASHBOARD_IMAGES), device=run.device,
                                              batch_size=run.cfg.batch_size))
    is_best = metrics["AP"] > run.best_ap
    run.best_ap = max(run.best_ap, metrics["AP"])
    ckpt = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "epoch": run.epoch, "config": asdict(run.cfg),
            "class_names": run.class_names, "history": run.history, "epochs": run.epochs,
            "best_ap": run.best_ap, "train_seconds": run.train_seconds, "rng": rng}
    if is_best:
        save_checkpoint(ckpt, run.out_dir / "best.pt")
    save_checkpoint(ckpt, run.out_dir / "last.pt")
    _write_json_atomic(run.out_dir / "metrics.json", run.summary())
    steps = run.total_steps // run.cfg.epochs
    print(f"epoch {run.epoch}/{run.cfg.epochs}: AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}  "
          f"loss {np.mean(run.history['loss'][-steps:]):.3f}  ({run.train_seconds:.0f} s training)")


def train(cfg: TrainConfig, *, out_dir="runs/cpu", resume: bool = False, device=None, data_root=None,
          stop_after_epochs: int | None = None, progress: bool = True, deterministic: bool = False,
          model: nn.Module | None = None, init=None, freeze_backbone_epochs: int = 0) -> dict:
    """Train a detector as cfg says, in this process (one of several under DDP: torchrun, or
    train_in_processes); write out_dir/last.pt, best.pt and metrics.json; return what
    metrics.json holds.

    resume=True continues from out_dir/last.pt; stop_after_epochs ends this call early (as a kill
    would) without changing the schedule. `model` is trained instead of the one cfg describes,
    as it is (same call signature and loss names; the side-by-side benchmark passes torchvision's
    detector). deterministic=True makes a CPU run repeatable to the last bit (one thread,
    deterministic kernels), so that a resumed run ends with the weights of an uninterrupted one;
    it sets both process-wide. init: start from a trained model's weights (init_from_checkpoint);
    freeze_backbone_epochs: the backbone stays frozen for that many first epochs (freeze_backbone).
    Your own data (cfg.data "coco" or "voc") is checked first: errors stop the run before its
    first step (check_before_training).
    """
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
    device = torch.device(device) if device else DEVICE
    run = setup_run(cfg, out_dir=out_dir, resume=resume, device=device, data_root=data_root, model=model,
                    init=init, progress=progress)
    last_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, run.epoch + stop_after_epochs)
    bad_steps = 0   # non-finite losses in a row, across epochs
    while run.epoch < last_epoch:
        if freeze_backbone_epochs:
            freeze_backbone(run, run.epoch < freeze_backbone_epochs)
        start = time.perf_counter()
        try:
            bad_steps = train_one_epoch(run.net, epoch_loader(run, run.epoch), run.optimizer, run.scheduler,
                                        device=run.device, history=run.history, clip_grad_norm=cfg.clip_grad_norm,
                                        max_bad_steps=cfg.max_bad_steps, amp=cfg.amp and run.device.type == "cuda",
                                        world=run.world, desc=f"epoch {run.epoch + 1}/{cfg.epochs}",
                                        progress=progress and run.rank == 0, bad_steps=bad_steps)
        except TrainingDiverged as err:
            raise TrainingDiverged(f"{err}; the last good checkpoint is {run.out_dir / 'last.pt'}") from None
        run.train_seconds += time.perf_counter() - start
        run.epoch += 1
        end_epoch(run, progress=progress)   # rank 0 evaluates and writes; the others wait for it
        if run.world > 1:
            dist.barrier()
    if run.world > 1:
        dist.destroy_process_group()
    return run.summary()


class TrainingProcessFailed(RuntimeError):
    """A process of train_in_processes ended before the run did (it died, was killed, or never
    started); the others stop with it, and last.pt keeps the last finished epoch."""


def train_in_processes(cfg: TrainConfig, *, device=None, progress: bool = True, **kwargs) -> dict:
    """train() as the CLI and notebook 05 run it: on a CPU, in cfg.cpu_processes DDP processes
    (at most one a core), as torchrun would start them; elsewhere, under torchrun, or with one
    process, just train() here.

    This process is rank 0 (its progress bars and messages show where it was called, a notebook
    included); the others are spawned with the same arguments and joined before it returns. Each
    process gets its share of the cores as torch threads. A process that ends early (it fails,
    is killed, or never starts) stops the run within seconds with TrainingProcessFailed, one
    line that says which and why."""
    if getattr(torch.multiprocessing.current_process(), "_inheriting", False):
        # A spawned process is re-running the caller's script at import (no __main__ guard): it
        # ends quietly, and rank 0 says why (_wait_for_start).
        raise SystemExit(1)
    device = torch.device(device) if device else DEVICE
    processes = min(cfg.cpu_processes, os.cpu_count() or 1)
    if device.type != "cpu" or processes == 1 or "WORLD_SIZE" in os.environ:
        return train(cfg, device=device, progress=progress, **kwargs)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(processes)}
    threads = max(1, (os.cpu_count() or 1) // processes)
    context = torch.multiprocessing.get_context("spawn")
    # One pipe a process, to say it has started: file descriptors, which a killed run leaves
    # nothing of (an Event's semaphore would outlive it, and multiprocessing warns about it)
    pipes = [context.Pipe(duplex=False) for _ in range(1, processes)]      # (reader, writer)
    others = [context.Process(target=_cpu_process_main, args=(rank, env, threads, cfg, device, kwargs, writer))
              for rank, (_, writer) in enumerate(pipes, start=1)]
    saved_env = {k: os.environ.get(k) for k in [*env, "RANK", "LOCAL_RANK"]}
    saved_threads = torch.get_num_threads()
    if progress:
        print(f"training in {processes} processes (DDP over gloo), {threads} thread(s) each")
    try:
        for p in others:
            p.start()
        _wait_for_start(others, [reader for reader, _ in pipes])
        os.environ.update(env, RANK="0", LOCAL_RANK="0")
        torch.set_num_threads(threads)
        result = train(cfg, device=device, progress=progress, **kwargs)
    except BaseException as err:
        # A collective that fails here means another process ended: name it rather than show
        # gloo's traceback. Any other error is this process's own.
        ended = _ended_early(others, wait=10.0) if _lost_a_peer(err) else ""
        for p in others:
            if p.pid is not None and p.exitcode is None:
                p.terminate()
        if ended:
            raise TrainingProcessFailed(f"{ended}; the other processes stopped too, and last.pt "
                                        "keeps the last finished epoch (resume continues from it)") from None
        raise
    finally:
        for p in others:
            if p.pid is not None:      # started (a start that failed leaves nothing to join)
                p.join()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(saved_threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    ended = _ended_early(others, wait=0.0)
    if ended:
        raise TrainingProcessFailed(ended)
    return result


def _wait_for_start(others: list, readers: list) -> None:
    """Until every spawned process has said it started its work; one that ends before (its import
    of the caller's script failed) stops the run here rather than leave rank 0 waiting for it."""
    while not all(reader.poll() for reader in readers):
        for rank, (p, reader) in enumerate(zip(others, readers, strict=True), start=1):
            if p.exitcode is not None and not reader.poll():
                raise TrainingProcessFailed(
                    f"training process {rank} ended (status {p.exitcode}) before it started. A script "
                    'that calls train_in_processes must call it under `if __name__ == "__main__":`, '
                    "since each process it starts imports the script again")
        time.sleep(0.05)


def _lost_a_peer(err: BaseException) -> bool:
    """Whether an error is gloo's report of a process that went away mid-collective."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo" in str(err).lower())


def _ended_early(others: list, *, wait: float) -> str:
    """Which spawned process ended with a failure (waiting up to `wait` seconds for one), or ""."""
    deadline = time.monotonic() + wait
    while True:
        for rank, p in enumerate(others, start=1):
            if p.exitcode is not None and p.exitcode < 0:
                return f"training process {rank} was killed ({signal.Signals(-p.exitcode).name})"
            if p.exitcode:
                return f"training process {rank} failed (status {p.exitcode}; its message is above)"
        if time.monotonic() >= deadline:
            return ""
        time.sleep(0.05)


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_process_main(rank: int, env: dict, threads: int, cfg: TrainConfig, device, kwargs: dict, started):
    """A spawned rank of train_in_processes: says it started (on the `started` pipe), then joins
    the run as torchrun would have started it. Whatever stops it is said in one line: rank 0
    reports the run's own errors."""
    started.send(True)
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        train(cfg, device=device, **kwargs, progress=False)
    except (TrainingDiverged, KeyboardInterrupt):
        sys.exit(1)        # every process stops alike; rank 0 says why
    except Exception as err:
        why = ("another process of the run ended" if _lost_a_peer(err)
               else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        print(f"training process {rank} stopped: {why}", file=sys.stderr)
        sys.exit(1)


# =============================================================================================
# 06 evaluation: the COCO detection metric, through pycocotools and from scratch
# =============================================================================================
# coco_evaluate — COCO metrics through pycocotools
# average_precision — the same metric from scratch, with numpy
# COCO_METRIC_KEYS, COCO_RECALL_THRESHOLDS, COCO_IOU_THRESHOLDS, COCO_AREA_RANGES,
#     COCO_MAX_DETS — COCOeval's parameters
# save_coco_results, to_coco_results — detections as a COCO results file
"""Section 06, evaluation. The COCO detection metric (Lin et al., 2014, "Microsoft COCO:
Common Objects in Context"; the rules are those of cocodataset.org/#detection-eval and of
pycocotools' COCOeval), computed twice: `coco_evaluate` asks the official pycocotools,
`average_precision` rebuilds it from scratch with numpy, and the tests hold the two equal.

    predictions  list of {"boxes": (D, 4) xyxy px, "scores": (D,), "labels": (D,) in 1..K}
    targets      list of {"boxes": (G, 4) xyxy px, "labels": (G,), optional "image_id",
                          "iscrowd": (G,) bool, "area": (G,)}
    precision    (T, R, K, A, M)  T = 10 IoU thresholds 0.50:0.05:0.95,
    recall       (T, K, A, M)     R = 101 recall points 0:0.01:1, K classes,
                                  A = 4 area ranges (all, small, medium, large),
                                  M = 3 caps on detections per image and class (1, 10, 100)

COCO files store boxes as (x, y, w, h); the conversion happens here, at the boundary.
Tensors may be torch (any device) or numpy. An image's id is target["image_id"] when the
target has one, else its position in the list.

A metric that COCO cannot define (no ground truth of any class in that area range, or no
ground truth at all) is -1, as pycocotools reports it, in both implementations: -1 keeps
`evaluate --json` valid JSON and cannot be mistaken for a real AP in 0..1.
"""

# The parameters of COCOeval (pycocotools Params.setDetParams). linspace, not arange: arange
# drifts, and AP75 looks its threshold up by equality with 0.75.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # (T,)
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # (R,)
# area = box w * h in px^2; a range includes both ends, so an area of exactly 32^2 is small and medium.
COCO_AREA_RANGES = {
    "all": (0.0, 1e5**2),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}  # (A,)
COCO_MAX_DETS = (1, 10, 100)  # (M,) highest-scoring detections kept per image *and class*
COCO_METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _numpy(x, dtype) -> np.ndarray:
    """A torch tensor (on any device) or an array-like, as a numpy array of `dtype`."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 -> (N, 4) x, y, w, h, the COCO layout."""
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _box_area(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy -> (N,) w * h, computed as COCO computes a result's area (from its xywh)."""
    wh = _xyxy_to_xywh(boxes)[:, 2:]
    return wh[:, 0] * wh[:, 1]


def _evaluation_inputs(predictions, targets, class_names=None):
    """Checks predictions and targets and turns them into float64/int64 numpy arrays.

    Returns (images, class_ids): images is a list, one dict per image in ascending image id
    order (COCOeval walks images that way, and the order ranks tied scores across images),
    with image_id, gt_boxes (G, 4), gt_labels (G,), gt_crowd (G,) bool, gt_area (G,),
    pred_boxes (D, 4), pred_scores (D,), pred_labels (D,). class_ids lists the K classes
    in ascending order: 1..len(class_names)-1 when names are given, and every label seen.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"evaluation got {len(predictions)} predictions for {len(targets)} targets; "
                         "they must pair up image by image")
    images, seen_ids = [], set()
    for index, (pred, target) in enumerate(zip(predictions, targets)):
        image_id = int(target["image_id"]) if "image_id" in target else index
        if image_id in seen_ids:
            raise ValueError(f"image_id {image_id} appears twice in the targets (target {index})")
        seen_ids.add(image_id)
        for name, mapping, keys in (("target", target, ("boxes", "labels")),
                                    ("prediction", pred, ("boxes", "scores", "labels"))):
            missing = [key for key in keys if key not in mapping]
            if missing:
                raise ValueError(f"{name} {index} (image_id {image_id}) has no {missing}")
        gt_boxes = _numpy(target["boxes"], np.float64).reshape(-1, 4)
        gt_labels = _numpy(target["labels"], np.int64).reshape(-1)
        num_gt = len(gt_boxes)
        gt_crowd = (_numpy(target["iscrowd"], bool).reshape(-1) if "iscrowd" in target
                    else np.zeros(num_gt, bool))
        gt_area = (_numpy(target["area"], np.float64).reshape(-1) if "area" in target
                   else _box_area(gt_boxes))
        pred_boxes = _numpy(pred["boxes"], np.float64).reshape(-1, 4)
        pred_scores = _numpy(pred["scores"], np.float64).reshape(-1)
        pred_labels = _numpy(pred["labels"], np.int64).reshape(-1)
        if not len(gt_labels) == len(gt_crowd) == len(gt_area) == num_gt:
            raise ValueError(f"target {index} (image_id {image_id}) has {num_gt} boxes but "
                             f"{len(gt_labels)} labels, {len(gt_crowd)} iscrowd, {len(gt_area)} areas")
        if not len(pred_scores) == len(pred_labels) == len(pred_boxes):
            raise ValueError(f"prediction {index} (image_id {image_id}) has {len(pred_boxes)} boxes, "
                             f"{len(pred_scores)} scores and {len(pred_labels)} labels")
        for name, labels in (("target", gt_labels), ("prediction", pred_labels)):
            if (labels < 1).any():
                raise ValueError(f"{name} {index} (image_id {image_id}) has label {labels.min()}; "
                                 "labels are 1..K, 0 is background and never evaluated")
        images.append(dict(image_id=image_id, gt_boxes=gt_boxes, gt_labels=gt_labels,
                           gt_crowd=gt_crowd, gt_area=gt_area, pred_boxes=pred_boxes,
                           pred_scores=pred_scores, pred_labels=pred_labels))
    images.sort(key=lambda image: image["image_id"])

    class_ids = set(range(1, len(class_names))) if class_names is not None else set()
    for image in images:
        class_ids.update(image["gt_labels"].tolist(), image["pred_labels"].tolist())
    if class_names is not None and class_ids and max(class_ids) >= len(class_names):
        raise ValueError(f"label {max(class_ids)} has no name: class_names holds {len(class_names)} "
                         "names, background included")
    return images, sorted(class_ids)


def to_coco_results(predictions, image_ids, label_to_cat_id=None) -> list[dict]:
    """Detections as a COCO results list, the input of pycocotools' COCO.loadRes.

    predictions: list of {"boxes": (D, 4) xyxy px, "scores": (D,), "labels": (D,)};
    image_ids: one COCO image id per prediction; label_to_cat_id: label -> COCO category id
    (a dict, or a list indexed by label; COCO's 80 classes carry ids 1..90 with gaps),
    None keeps labels as ids. One {"image_id", "category_id", "bbox": [x, y, w, h], "score"}
    per detection.
    """
    if len(image_ids) != len(predictions):
        raise ValueError(f"to_coco_results got {len(predictions)} predictions "
                         f"for {len(image_ids)} image ids")
    results = []
    for pred, image_id in zip(predictions, image_ids):
        boxes = _xyxy_to_xywh(_numpy(pred["boxes"], np.float64).reshape(-1, 4))
        scores = _numpy(pred["scores"], np.float64).reshape(-1)
        labels = _numpy(pred["labels"], np.int64).reshape(-1)
        for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            try:
                category_id = label if label_to_cat_id is None else label_to_cat_id[label]
            except (KeyError, IndexError):
                raise ValueError(f"label {label} (image_id {image_id}) has no COCO category id "
                                 "in label_to_cat_id") from None
            results.append({"image_id": int(image_id), "category_id": int(category_id),
                            "bbox": box, "score": score})
    return results


def save_coco_results(path, predictions, image_ids, label_to_cat_id=None) -> pathlib.Path:
    """Writes to_coco_results(...) as a JSON file (the format COCO's evaluation server takes)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_coco_results(predictions, image_ids, label_to_cat_id)))
    return path


def _coco_ground_truth(images, class_ids, class_names=None) -> dict:
    """The targets as an in-memory COCO annotation file (a dict like instances_*.json)."""
    annotations = []
    for image in images:
        boxes = _xyxy_to_xywh(image["gt_boxes"]).tolist()
        for box, label, crowd, area in zip(boxes, image["gt_labels"].tolist(),
                                           image["gt_crowd"].tolist(), image["gt_area"].tolist()):
            # ids start at 1: COCOeval stores the matched gt id per detection and reads 0 as "unmatched"
            annotations.append({"id": len(annotations) + 1, "image_id": image["image_id"],
                                "category_id": label, "bbox": box, "area": area,
                                "iscrowd": int(crowd)})
    names = list(class_names) if class_names is not None else []
    return {"images": [{"id": image["image_id"]} for image in images],
            "categories": [{"id": c, "name": str(names[c]) if c < len(names) else str(c)}
                           for c in class_ids],
            "annotations": annotations}


def _summarize(precision: np.ndarray, recall: np.ndarray) -> dict:
    """COCOeval.summarize: each of the 12 numbers is the mean of the defined (> -1) entries of
    a slice of precision (T, R, K, A, M) or recall (T, K, A, M); -1 when none is defined."""
    def mean(x):
        x = x[x > -1]
        return float(np.mean(x)) if x.size else -1.0

    all_, small, medium, large = 0, 1, 2, 3  # area range index a
    t50, t75 = 0, 5  # IoU threshold index t: 0.50, 0.75
    m1, m10, m100 = 0, 1, 2  # detection cap index m
    return {"AP": mean(precision[:, :, :, all_, m100]),
            "AP50": mean(precision[t50, :, :, all_, m100]),
            "AP75": mean(precision[t75, :, :, all_, m100]),
            "APs": mean(precision[:, :, :, small, m100]),
            "APm": mean(precision[:, :, :, medium, m100]),
            "APl": mean(precision[:, :, :, large, m100]),
            "AR1": mean(recall[:, :, all_, m1]),
            "AR10": mean(recall[:, :, all_, m10]),
            "AR100": mean(recall[:, :, all_, m100]),
            "ARs": mean(recall[:, :, small, m100]),
            "ARm": mean(recall[:, :, medium, m100]),
            "ARl": mean(recall[:, :, large, m100])}


def _details(precision, recall, class_ids, class_names) -> dict:
    """What notebook 06 draws: PR curves and the AP of each class (AP@[.5:.95], all areas, 100 dets)."""
    all_, m100 = 0, 2
    per_class = {}
    for k, class_id in enumerate(class_ids):
        p = precision[:, :, k, all_, m100]  # (T, R)
        per_class[class_id] = float(p.mean()) if (p > -1).any() else -1.0
    return {"precision": precision, "recall": recall, "class_ids": list(class_ids),
            "class_names": [class_names[c] for c in class_ids] if class_names is not None else None,
            "per_class_AP": per_class,
            "iou_thresholds": COCO_IOU_THRESHOLDS, "recall_thresholds": COCO_RECALL_THRESHOLDS,
            "area_ranges": list(COCO_AREA_RANGES), "max_dets": list(COCO_MAX_DETS)}


def coco_evaluate(predictions, targets, *, class_names=None, verbose=False, return_details=False) -> dict:
    """The COCO box metric by the official pycocotools (COCOeval, iouType "bbox").

    predictions and targets pair up image by image (section docstring). class_names
    (background first, as ds.class_names) names the categories and declares classes 1..K.
    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
    "ARl"} in 0..1 (-1 where undefined) and "images", the number of images. return_details
    adds pycocotools' "precision" (T, R, K, A, M) and "recall" (T, K, A, M), "class_ids"
    (the K axis) and "per_class_AP". verbose shows pycocotools' own printout.
    """
    # pycocotools is imported here, not at the top: the rest of the module, average_precision
    # included, needs only numpy and torch.
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError("coco_evaluate needs pycocotools (pip install pycocotools); "
                          "average_precision computes the same numbers without it") from error

    images, class_ids = _evaluation_inputs(predictions, targets, class_names)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = _coco_ground_truth(images, class_ids, class_names)
        coco_gt.createIndex()
        results = to_coco_results([{"boxes": im["pred_boxes"], "scores": im["pred_scores"],
                                    "labels": im["pred_labels"]} for im in images],
                                  [im["image_id"] for im in images])
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes reads results[0] and fails on an empty list; an empty result set is valid
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset["images"],
                               "categories": coco_gt.dataset["categories"], "annotations": []}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    metrics = dict(zip(COCO_METRIC_KEYS, (float(s) for s in coco_eval.stats)))
    metrics["images"] = len(images)
    if return_details:
        metrics.update(_details(coco_eval.eval["precision"], coco_eval.eval["recall"],
                                class_ids, class_names))
    return metrics


def _coco_iou(pred_boxes: np.ndarray, gt_boxes: np.ndarray, gt_crowd: np.ndarray) -> np.ndarray:
    """(D, 4) x (G, 4) xyxy -> (D, G) IoU, with COCO's crowd rule.

    A crowd region covers many objects, so a detection inside it is judged by how much of the
    *detection* lies in the region: IoU = intersection / area(detection) for crowd gts.
    """
    lt = np.maximum(pred_boxes[:, None, :2], gt_boxes[None, :, :2])  # (D, G, 2)
    rb = np.minimum(pred_boxes[:, None, 2:], gt_boxes[None, :, 2:])  # (D, G, 2)
    wh = np.clip(rb - lt, 0, None)  # (D, G, 2); 0 where the boxes do not overlap
    inter = wh[..., 0] * wh[..., 1]  # (D, G)
    pred_area, gt_area = _box_area(pred_boxes), _box_area(gt_boxes)
    union = np.where(gt_crowd[None, :], pred_area[:, None], pred_area[:, None] + gt_area[None, :] - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=inter > 0)


def _greedy_match(ious: np.ndarray, gt_ignore: np.ndarray, gt_crowd: np.ndarray):
    """COCO's greedy matching of one image and class, at all T IoU thresholds at once.

    ious (D, G) with detections in descending score order. Each detection in turn takes the
    still-unmatched gt of highest IoU >= t; crowd gts stay available (one crowd region can
    hold many objects). A regular gt beats any ignored one (pycocotools sorts ignored gts last
    and stops at the first of them once it holds a regular match); among equal IoUs the last
    gt wins, as pycocotools' `>=` scan does. A detection matched to an ignored gt is ignored.
    Returns dt_matched (T, D) and dt_ignore (T, D), both bool, and dt_gt (T, D), the gt each
    detection took (-1: none; section 08 needs it to tell duplicates from other errors).
    """
    num_dt, num_gt = ious.shape
    num_t = len(COCO_IOU_THRESHOLDS)
    thresholds = np.minimum(COCO_IOU_THRESHOLDS, 1 - 1e-10)[:, None]  # (T, 1); pycocotools' cap
    gt_taken = np.zeros((num_t, num_gt), bool)
    dt_matched = np.zeros((num_t, num_dt), bool)
    dt_ignore = np.zeros((num_t, num_dt), bool)
    dt_gt = -np.ones((num_t, num_dt), np.int64)
    if num_gt == 0:  # nothing to match: every detection is a false positive (or out of range)
        return dt_matched, dt_ignore, dt_gt
    rows = np.arange(num_t)
    for d in range(num_dt):  # greedy: a detection sees only the gts its betters left
        free = (~gt_taken | gt_crowd) & (ious[d] >= thresholds)  # (T, G)
        has_regular = (free & ~gt_ignore).any(axis=1, keepdims=True)  # (T, 1)
        candidates = free & np.where(has_regular, ~gt_ignore, gt_ignore)  # (T, G)
        iou_or_minus = np.where(candidates, ious[d], -1.0)  # (T, G)
        best = num_gt - 1 - iou_or_minus[:, ::-1].argmax(axis=1)  # (T,) the last gt of highest IoU
        hit = candidates.any(axis=1)  # (T,)
        gt_taken[rows[hit], best[hit]] = True
        dt_matched[:, d] = hit
        dt_ignore[:, d] = hit & gt_ignore[best]
        dt_gt[hit, d] = best[hit]
    return dt_matched, dt_ignore, dt_gt


def _evaluate_image_class(image: dict, class_id: int):
    """COCOeval.evaluateImg for one image and one class, for each area range.

    Returns None when the image has neither gts nor detections of the class, else a list
    over the A area ranges of (scores (D,), dt_matched (T, D), dt_ignore (T, D), num_gt),
    with detections sorted by descending score (stable, as pycocotools' mergesort) and cut
    to the highest max(COCO_MAX_DETS); num_gt counts the gts that are not ignored.
    """
    is_gt, is_dt = image["gt_labels"] == class_id, image["pred_labels"] == class_id
    if not is_gt.any() and not is_dt.any():
        return None
    gt_boxes, gt_crowd = image["gt_boxes"][is_gt], image["gt_crowd"][is_gt]
    gt_area = image["gt_area"][is_gt]
    scores = image["pred_scores"][is_dt]
    order = np.argsort(-scores, kind="mergesort")[:max(COCO_MAX_DETS)]  # ties keep input order
    scores, pred_boxes = scores[order], image["pred_boxes"][is_dt][order]
    pred_area = _box_area(pred_boxes)
    ious = _coco_iou(pred_boxes, gt_boxes, gt_crowd)  # (D, G)
    per_range = []
    for lo, hi in COCO_AREA_RANGES.values():
        # crowd gts and gts outside the range are ignored: matching one neither helps nor hurts
        gt_ignore = gt_crowd | (gt_area < lo) | (gt_area > hi)
        dt_matched, dt_ignore, _ = _greedy_match(ious, gt_ignore, gt_crowd)
        # an unmatched detection outside the range may belong to a gt outside it: not a false positive
        outside = (pred_area < lo) | (pred_area > hi)
        dt_ignore |= ~dt_matched & outside[None, :]
        per_range.append((scores, dt_matched, dt_ignore, int((~gt_ignore).sum())))
    return per_range


def _precision_recall(evaluations: list, max_det: int):
    """COCOeval.accumulate for one class, area range and detection cap.

    evaluations: one (scores, dt_matched, dt_ignore, num_gt) per image, images in id order.
    Every image keeps its `max_det` best detections; all of them are then ranked by score
    (stable, so tied scores keep image order) and swept from the top. Precision at recall r
    is the highest precision at any recall >= r (the curve made monotone from the right),
    read at the 101 recall points. Returns precision (T, R) and recall (T,) (the recall
    reached at the end), or None when the class has no non-ignored gt here (undefined, -1).
    """
    num_gt = sum(e[3] for e in evaluations)
    if num_gt == 0:
        return None
    scores = np.concatenate([e[0][:max_det] for e in evaluations])  # (D,) all images
    order = np.argsort(-scores, kind="mergesort")
    dt_matched = np.concatenate([e[1][:, :max_det] for e in evaluations], axis=1)[:, order]  # (T, D)
    dt_ignore = np.concatenate([e[2][:, :max_det] for e in evaluations], axis=1)[:, order]  # (T, D)
    tp_sum = np.cumsum(dt_matched & ~dt_ignore, axis=1).astype(float)  # (T, D)
    fp_sum = np.cumsum(~dt_matched & ~dt_ignore, axis=1).astype(float)  # (T, D)
    num_dt = len(scores)
    recall_curve = tp_sum / num_gt  # (T, D), non-decreasing along D
    precision_curve = tp_sum / (tp_sum + fp_sum + np.spacing(1))  # (T, D)
    # the monotone envelope: a suffix maximum, as pycocotools' right-to-left loop computes it
    precision_curve = np.maximum.accumulate(precision_curve[:, ::-1], axis=1)[:, ::-1]
    precision = np.zeros((len(COCO_IOU_THRESHOLDS), len(COCO_RECALL_THRESHOLDS)))  # (T, R)
    for t in range(len(COCO_IOU_THRESHOLDS)):
        # the first detection whose recall reaches each recall point; recall never reached -> 0
        first = np.searchsorted(recall_curve[t], COCO_RECALL_THRESHOLDS, side="left")  # (R,)
        reached = first < num_dt
        precision[t, reached] = precision_curve[t, first[reached]]
    recall = recall_curve[:, -1] if num_dt else np.zeros(len(COCO_IOU_THRESHOLDS))  # (T,)
    return precision, recall


def average_precision(predictions, targets, *, class_names=None, return_details=False) -> dict:
    """The COCO box metric written from scratch; equals coco_evaluate (tests check 1e-4).

    COCO's rules (cocodataset.org/#detection-eval, pycocotools COCOeval): per class and image,
    detections are matched greedily in descending score order to gts at 10 IoU thresholds
    0.50:0.05:0.95 (_greedy_match); per class, precision is read at 101 recall points
    (_precision_recall); AP is the mean over thresholds, recall points and the classes that
    have ground truth. APs/APm/APl count only gts of area < 32^2, 32^2..96^2, > 96^2
    (the others, and crowd gts, are ignored); AR1/AR10/AR100 are the recall reached with at
    most 1/10/100 detections per image and class, averaged over thresholds and classes.
    Returns the keys of coco_evaluate (-1 where undefined); return_details adds
    "precision" (T, R, K, A, M), "recall" (T, K, A, M), "class_ids" (K,), "per_class_AP".
    """
    images, class_ids = _evaluation_inputs(predictions, targets, class_names)
    num_t, num_r = len(COCO_IOU_THRESHOLDS), len(COCO_RECALL_THRESHOLDS)
    num_k, num_a, num_m = len(class_ids), len(COCO_AREA_RANGES), len(COCO_MAX_DETS)
    precision = -np.ones((num_t, num_r, num_k, num_a, num_m))  # -1: undefined
    recall = -np.ones((num_t, num_k, num_a, num_m))
    for k, class_id in enumerate(class_ids):
        per_image = [_evaluate_image_class(image, class_id) for image in images]
        per_image = [e for e in per_image if e is not None]  # images with nothing of this class
        for a in range(num_a):
            for m, max_det in enumerate(COCO_MAX_DETS):
                result = _precision_recall([e[a] for e in per_image], max_det)
                if result is not None:
                    precision[:, :, k, a, m], recall[:, k, a, m] = result
    metrics = _summarize(precision, recall)
    metrics["images"] = len(images)
    if return_details:
        metrics.update(_details(precision, recall, class_ids, class_names))
    return metrics


# =============================================================================================
# 08 diagnosis: error types (TIDE), the object funnel, the training dashboard
# =============================================================================================
# error_analysis — every false positive and missed object by TIDE's six types, and the AP50 each costs
# ERROR_TYPES, TIDE_FG_IOU, TIDE_BG_IOU — the types, and the two IoU thresholds that define them
# read_coco_results, errors_from_files — the `errors` command: any COCO ground truth and results file
# format_errors — the table that `errors` and `evaluate --errors` print
# object_funnel, FUNNEL_STAGES — the stage of the model where each ground-truth object was lost
# funnel_table, size_group — the funnel counted per object size or per class
# epoch_dashboard, DASHBOARD_IMAGES — per epoch: validation losses, RPN recall, gt share, RoI levels
"""Section 08, diagnosis. One AP number does not say what to fix; this section says where the
AP went, on the same matching as section 06 (COCO's greedy matching at IoU 0.5, 101 recall
points, the best 100 detections per image and class).

Error types (Bolya et al., 2020, "TIDE: A General Toolbox for Identifying Object Detection
Errors", Sec. 2.2; foreground IoU t_f = 0.5, background IoU t_b = 0.1). Each false positive,
tested in this order as TIDE's reference code (dbolya/tide, tidecv/quantify.py) tests it:

    loc   its own class's best gt has t_b <= IoU <= t_f          (right class, box off)
    cls   a gt of another class has IoU >= t_f                   (right box, wrong class)
    dupe  a gt of its class, already matched, has IoU >= t_f     (a second detection of it)
    bkg   no gt has IoU > t_b (or the image has no gt)           (detected background)
    both  anything else: a wrong class and a box off             (t_b < IoU < t_f, other class)
    miss  a gt that nothing matched, and no cls or loc error points at

dAP of a type is the AP50 gained when an oracle fixes that type alone (Sec. 2.3): cls and loc
errors become true positives (relabelled, or moved onto their gt), at most one per gt, the
best-scoring one, and only for a gt that nothing matched; the rest of them, and every both,
dupe and bkg error, are dropped. A miss is fixed by taking its gt out of the count of gts
(TIDE's MissedError.fix returns (class, -1): one gt fewer). fp_dAP drops every false
positive; fn_dAP takes every unmatched gt out. dAP is clipped at 0 as TIDE clips it (a fix
only adds true positives, drops false ones or removes gts, but a class it empties leaves the mean).

Classes follow section 06: AP50 averages the classes that have ground truth; a class whose gts
a fix removes entirely counts 0 while it still has detections and drops out when it has none
(as in TIDE's ClassedAPDataObject). Crowd gts are neither errors nor misses: a detection on one
is ignored, as in the AP.
"""

ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
TIDE_FG_IOU = 0.5  # t_f: at or above it a box is on its object
TIDE_BG_IOU = 0.1  # t_b: at or below it a box is on the background


def _diagnose_image(image: dict) -> tuple[list, np.ndarray]:
    """One image (from _evaluation_inputs): COCO's matching at IoU 0.5, then TIDE's type of each
    false positive. Returns (detections, gt_used): detections a list of [label, score, rank,
    state, gt] for the detections that section 06 keeps (the best 100 per class), state "tp",
    "ignore" (matched a crowd gt) or an error type, gt the image's gt index the error points at
    (-1: none); gt_used (G,) bool, the gts a true positive matched."""
    gt_boxes, gt_labels = image["gt_boxes"], image["gt_labels"]
    lo, hi = COCO_AREA_RANGES["all"]
    gt_ignore = image["gt_crowd"] | (image["gt_area"] < lo) | (image["gt_area"] > hi)  # (G,)
    gt_used = np.zeros(len(gt_boxes), bool)
    detections = []
    t50 = 0  # row of IoU 0.5 in _greedy_match's (T, D) answers
    for class_id in np.union1d(gt_labels, image["pred_labels"]):
        is_dt, gt_index = np.flatnonzero(image["pred_labels"] == class_id), np.flatnonzero(gt_labels == class_id)
        # the order and cap of _evaluate_image_class: descending score, ties in input order
        is_dt = is_dt[np.argsort(-image["pred_scores"][is_dt], kind="mergesort")[:max(COCO_MAX_DETS)]]
        ious = _coco_iou(image["pred_boxes"][is_dt], gt_boxes[gt_index], image["gt_crowd"][gt_index])  # (D, G_c)
        matched, ignored, took = _greedy_match(ious, gt_ignore[gt_index], image["gt_crowd"][gt_index])
        for j, d in enumerate(is_dt):
            state = "ignore" if ignored[t50, j] else "tp" if matched[t50, j] else "fp"
            if state == "tp":
                gt_used[gt_index[took[t50, j]]] = True
            detections.append([int(class_id), float(image["pred_scores"][d]), int(d), state, -1])
    # TIDE's tests, on plain IoU against the gts that count (crowd gts are ignore regions there)
    iou = _coco_iou(image["pred_boxes"], gt_boxes, np.zeros(len(gt_boxes), bool))  # (D_all, G)
    iou = np.where(gt_ignore[None, :], 0.0, iou)
    for det in detections:
        if det[3] != "fp":
            continue
        label, d = det[0], det[2]
        same = gt_labels == label  # (G,)
        own, other, used = np.where(same, iou[d], 0), np.where(~same, iou[d], 0), np.where(same & gt_used, iou[d], 0)
        if gt_ignore.all():
            det[3] = "bkg"  # nothing to find in this image
        elif TIDE_BG_IOU <= own.max() <= TIDE_FG_IOU:
            det[3], det[4] = "loc", int(own.argmax())
        elif other.max() >= TIDE_FG_IOU:
            det[3], det[4] = "cls", int(other.argmax())
        elif used.max() >= TIDE_FG_IOU:
            det[3] = "dupe"
        elif iou[d].max() <= TIDE_BG_IOU:
            det[3] = "bkg"
        else:
            det[3] = "both"
    return detections, gt_used


def _ap50(detections: list, num_gt: list, class_ids) -> float:
    """AP50 as section 06 computes it, from per-image detections ([label, score, rank, state, gt])
    and per-image {class: number of gts that count}: mean over the classes that had gts
    (class_ids), a class left with no gts counting 0 with detections and nothing without."""
    aps = []
    num_t = len(COCO_IOU_THRESHOLDS)
    for class_id in class_ids:
        evaluations = []
        for dets, counts in zip(detections, num_gt):
            mine = sorted((d for d in dets if d[0] == class_id), key=lambda d: (-d[1], d[2]))
            scores = np.array([d[1] for d in mine])
            hit = np.array([d[3] in ("tp", "ignore") for d in mine], bool)
            ignore = np.array([d[3] == "ignore" for d in mine], bool)
            evaluations.append((scores, np.tile(hit, (num_t, 1)), np.tile(ignore, (num_t, 1)),
                                counts.get(class_id, 0)))
        result = _precision_recall(evaluations, max(COCO_MAX_DETS))
        if result is not None:
            aps.append(result[0][0].mean())  # IoU 0.5's row, averaged over the 101 recall points
        elif any(e[0].size for e in evaluations):
            aps.append(0.0)
    return float(np.mean(aps)) if aps else 0.0


def error_analysis(predictions, targets, *, class_names=None, return_details=False) -> dict:
    """TIDE's error types and their dAP (section docstring), on the inputs of average_precision.

    Returns {"AP50": a, "errors": {type: {"count": n, "dAP": x}} for the six ERROR_TYPES,
    "fp_dAP": x, "fn_dAP": x}, AP values in 0..1; AP50 equals average_precision's (tested).
    return_details adds "true_positives" (how many detections matched at IoU 0.5) and
    "detections": per image (in the order of `targets`) a list of (detection index, type or "tp"
    or "ignore") and "missed", per image the indices of its missed gts.
    """
    images, class_ids = _evaluation_inputs(predictions, targets, class_names)
    per_image = [_diagnose_image(image) for image in images]
    detections = [dets for dets, _ in per_image]
    counts_gt = []  # per image {class: gts that count}
    for image in images:
        counts = image["gt_labels"][~image["gt_crowd"]]
        counts_gt.append({int(c): int(n) for c, n in zip(*np.unique(counts, return_counts=True))})
    evaluated = [c for c in class_ids if any(c in counts for counts in counts_gt)]
    base = _ap50(detections, counts_gt, evaluated)

    # cls and loc errors compete for their gt: the best-scoring one on a gt nothing matched is the
    # one an oracle would fix (TIDE's BestGTMatch); a gt one of them points at is not a miss.
    fixer = {}
    for i, (dets, gt_used) in enumerate(per_image):
        for k, det in enumerate(dets):
            if det[3] in ("cls", "loc") and not gt_used[det[4]]:
                key = (i, det[4])
                if key not in fixer or det[1] > detections[fixer[key][0]][fixer[key][1]][1]:
                    fixer[key] = (i, k)
    chosen = set(fixer.values())
    unmatched = [np.flatnonzero(~used & ~image["gt_crowd"]).tolist() for image, (_, used) in zip(images, per_image)]
    missed = [[g for g in gts if (i, g) not in fixer] for i, gts in enumerate(unmatched)]

    def fixed(types, relabel=False):  # the detections once an oracle fixed `types`
        out = []
        for i, dets in enumerate(detections):
            kept = []
            for k, det in enumerate(dets):
                if det[3] in types and (i, k) in chosen and relabel:
                    gt_label = int(images[i]["gt_labels"][det[4]])
                    kept.append([gt_label if det[3] == "cls" else det[0], det[1], det[2], "tp", -1])
                elif det[3] not in types:
                    kept.append(det)
            out.append(kept)
        return out

    def without_gts(gts):  # per image, the gt indices taken out of the count
        out = []
        for image, counts, remove in zip(images, counts_gt, gts):
            counts = dict(counts)
            for g in remove:
                counts[int(image["gt_labels"][g])] -= 1
            out.append(counts)
        return out

    errors = {}
    for kind in ERROR_TYPES:
        if kind == "miss":
            ap = _ap50(detections, without_gts(missed), evaluated)
            count = sum(map(len, missed))
        else:
            ap = _ap50(fixed({kind}, relabel=kind in ("cls", "loc")), counts_gt, evaluated)
            count = sum(det[3] == kind for dets in detections for det in dets)
        errors[kind] = {"count": int(count), "dAP": max(ap - base, 0.0)}
    fp_ap = _ap50(fixed({"cls", "loc", "both", "dupe", "bkg"}), counts_gt, evaluated)
    fn_ap = _ap50(detections, without_gts(unmatched), evaluated)
    result = {"AP50": base, "errors": errors, "fp_dAP": fp_ap - base, "fn_dAP": fn_ap - base}
    if return_details:
        order = {image["image_id"]: i for i, image in enumerate(images)}
        ids = [int(t["image_id"]) if "image_id" in t else n for n, t in enumerate(targets)]
        result["true_positives"] = sum(det[3] == "tp" for dets in detections for det in dets)
        result["detections"] = [[(det[2], det[3]) for det in detections[order[i]]] for i in ids]
        result["missed"] = [missed[order[i]] for i in ids]
    return result


def read_coco_results(path, ground_truth: "CocoDetection") -> list[dict]:
    """A COCO results file ([{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]) as
    predictions in the order of ground_truth's images, labels in its 1..K. A result naming an
    image or category the ground truth lacks, or a bbox that is not 4 finite numbers with
    w, h >= 0, raises ValueError naming the entry."""
    try:
        results = json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: results file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(results, list):
        raise ValueError(f"{path}: a COCO results file is a JSON list of detections, got {type(results).__name__}")
    position = {image_id: i for i, image_id in enumerate(ground_truth.image_ids)}
    boxes, scores, labels = ([[] for _ in position] for _ in range(3))

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for k, r in enumerate(results):
        if not isinstance(r, dict) or any(key not in r for key in ("image_id", "category_id", "bbox", "score")):
            raise ValueError(f"{path}: result {k} needs 'image_id', 'category_id', 'bbox' and 'score'; got {r!r}")
        bbox = r["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(number, bbox))
                and bbox[2] >= 0 and bbox[3] >= 0) or not number(r["score"]):
            raise ValueError(f"{path}: result {k} needs 'bbox' as 4 finite numbers [x, y, w, h] with w, h >= 0 "
                             f"and a finite 'score'; got bbox {bbox!r}, score {r['score']!r}")
        if r["image_id"] not in position:
            raise ValueError(f"{path}: result {k} names image_id {r['image_id']!r}, which the ground truth lacks")
        if r["category_id"] not in ground_truth.cat_id_to_label:
            raise ValueError(f"{path}: result {k} names category_id {r['category_id']!r}, which the ground "
                             f"truth lacks (ids {sorted(ground_truth.cat_id_to_label)})")
        i = position[r["image_id"]]
        x, y, w, h = bbox
        boxes[i].append([x, y, x + w, y + h])  # xywh -> xyxy
        scores[i].append(r["score"])
        labels[i].append(ground_truth.cat_id_to_label[r["category_id"]])
    return [{"boxes": torch.tensor(b, dtype=torch.float64).reshape(-1, 4), "scores": torch.tensor(s, dtype=torch.float64),
             "labels": torch.tensor(lab, dtype=torch.int64)} for b, s, lab in zip(boxes, scores, labels)]


def errors_from_files(gt_path, dets_path) -> dict:
    """error_analysis of a COCO results file against a COCO ground truth file (the `errors`
    command): images of the ground truth without objects count, their detections are bkg."""
    with warnings.catch_warnings():  # the reader warns about boxes it clips: not news here
        warnings.simplefilter("ignore", DatasetWarning)
        ground_truth = CocoDetection(pathlib.Path(gt_path).parent, gt_path)
    predictions = read_coco_results(dets_path, ground_truth)
    targets = [ground_truth.target(i) for i in range(len(ground_truth))]
    result = error_analysis(predictions, targets, class_names=ground_truth.class_names)
    result["images"], result["objects"] = len(targets), int(sum(len(t["boxes"]) for t in targets))
    result["detections"] = int(sum(len(p["scores"]) for p in predictions))
    return result


def format_errors(result: dict) -> str:
    """error_analysis's dict as a table, AP values in points (x 100)."""
    lines = [f"AP50 {100 * result['AP50']:.2f} (AP values x 100)" + (
        f"   ({result['images']} images, {result['objects']} objects, {result['detections']} detections)"
        if "images" in result else ""),
        f"{'type':<6}{'count':>7}{'dAP':>8}"]
    for kind, e in result["errors"].items():
        lines.append(f"{kind:<6}{e['count']:>7}{100 * e['dAP']:>8.2f}")
    lines.append(f"{'FP':<6}{'':>7}{100 * result['fp_dAP']:>8.2f}   every false positive fixed")
    lines.append(f"{'FN':<6}{'':>7}{100 * result['fn_dAP']:>8.2f}   every missed object fixed")
    return "\n".join(lines)


# ---- the object funnel -------------------------------------------------------------------------

FUNNEL_STAGES = ("rpn", "classification", "localisation", "suppressed", "low_score", "detected")


@torch.no_grad()
def _funnel_batch(model: "FasterRCNN", images: list[Tensor], targets: list[dict], score_threshold: float):
    """FasterRCNN.forward in eval mode, one part at a time, keeping what each stage saw.
    Returns the model's detections (in input pixels, exactly what model(images) returns) and,
    per image, the stage of each gt (G,) as indices into FUNNEL_STAGES (before "detected")."""
    original_sizes = [tuple(img.shape[-2:]) for img in images]
    batch, image_sizes, resized = model.transform(images, targets)  # (N, 3, H, W); gts in its pixels
    backbone = inference_backbone(model) if model.fused_inference else model.backbone  # as forward does
    features = backbone(batch)  # P2..P6
    proposals, _, _ = model.rpn(batch.shape[-2:], image_sizes, features)  # the kept top-N, (R_i, 4)
    heads = model.roi_heads
    roi_features = heads.box_head(heads.box_roi_pool(features[:4], proposals, image_sizes))  # (R, 1024)
    class_logits, box_deltas = heads.box_predictor(roi_features)  # (R, K), (R, K*4)
    boxes = heads.box_coder.decode(box_deltas, torch.cat(proposals))  # (R, K, 4)
    scores = F.softmax(class_logits, dim=-1)  # (R, K)
    detections = heads.postprocess(class_logits, box_deltas, proposals, image_sizes)
    counts = [len(p) for p in proposals]
    stages = []
    for props, boxes_i, scores_i, size, det, target in zip(
            proposals, boxes.split(counts), scores.split(counts), image_sizes, detections, resized):
        gt_boxes, gt_labels = target["boxes"].to(props), target["labels"]
        stage = torch.full((len(gt_boxes),), FUNNEL_STAGES.index("suppressed"), dtype=torch.int64)
        boxes_i = clip_boxes_to_image(boxes_i, size)  # (R_i, K, 4), as postprocess clips
        for g, (box, label) in enumerate(zip(gt_boxes, gt_labels)):
            near = box_iou(props, box[None])[:, 0] >= 0.5  # (R_i,) proposals on the object
            own_boxes = boxes_i[:, label]  # (R_i, 4) each RoI's box for the object's class
            sized = (own_boxes[:, 2] - own_boxes[:, 0] >= 1e-2) & (own_boxes[:, 3] - own_boxes[:, 1] >= 1e-2)
            on_box = (box_iou(own_boxes, box[None])[:, 0] >= 0.5) & sized  # (R_i,) after regression
            scored = scores_i[:, label] > heads.score_thresh  # (R_i,) what postprocess keeps
            found = (box_iou(det["boxes"], box[None])[:, 0] >= 0.5) & (det["labels"] == label)  # (D_i,)
            if not near.any():
                stage[g] = FUNNEL_STAGES.index("rpn")
            elif not (scored & (near | on_box)).any():
                stage[g] = FUNNEL_STAGES.index("classification")
            elif not (scored & on_box).any():
                stage[g] = FUNNEL_STAGES.index("localisation")
            elif found.any() and det["scores"][found].max() < score_threshold:
                stage[g] = FUNNEL_STAGES.index("low_score")
            # else suppressed: NMS or the per-image cap removed its boxes, or a neighbour took the one left
        stages.append(stage)
    return model.transform.postprocess(detections, image_sizes, original_sizes), stages


def object_funnel(model: "FasterRCNN", dataset, score_threshold: float = 0.5, *, device=None,
                  batch_size: int = 4, progress: bool = True) -> list[dict]:
    """Where each ground-truth object of `dataset` was lost: one record per object (crowd regions
    are not objects to find), {"image": index, "gt": index in its target, "label", "box" (4,)
    xyxy input px, "area", "stage"}, stage one of FUNNEL_STAGES, the first that applies:

        detected        a detection scored >= score_threshold matches it (COCO's greedy
                        matching at IoU 0.5: the true positives of error_analysis, tested)
        rpn             no proposal among the RPN's kept top-N has IoU >= 0.5 with it
        classification  no RoI on it (proposal or box at IoU >= 0.5) scores its class above the
                        box head's score_thresh (the 0.05 below which postprocess drops boxes)
        localisation    some do, but none of their boxes for its class has IoU >= 0.5 after
                        regression
        low_score       a detection of its class at IoU >= 0.5 survives, scored below the threshold
        suppressed      boxes that would have found it were removed by NMS or the per-image cap
                        (or the one left was matched to a neighbouring object)

    The model runs part by part (_funnel_batch), the same computation as model(images).
    """
    device = device or next(model.parameters()).device
    model.eval()
    loader = make_data_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    records, index = [], 0
    for images, targets in tqdm(loader, desc="funnel", disable=not progress, leave=False):
        images = [img.to(device) for img in images]
        on_device = [{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]
        detections, stages = _funnel_batch(model, images, on_device, score_threshold)
        for det, stage, target in zip(detections, stages, targets):
            kept = det["scores"].cpu() >= score_threshold
            prediction = {k: v.cpu()[kept] for k, v in det.items()}
            image = _evaluation_inputs([prediction], [target])[0][0]
            _, gt_used = _diagnose_image(image)
            crowd = target.get("iscrowd", torch.zeros(len(target["boxes"]), dtype=torch.bool))
            for g, (box, label) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist())):
                if crowd[g]:
                    continue
                name = "detected" if gt_used[g] else FUNNEL_STAGES[int(stage[g])]
                records.append({"image": index, "gt": g, "label": int(label), "box": box,
                                "area": (box[2] - box[0]) * (box[3] - box[1]), "stage": name})
            index += 1
    return records


def funnel_table(records: list[dict], key) -> dict:
    """{group: {stage: count}} with stages in FUNNEL_STAGES order; key(record) -> its group."""
    table = {}
    for record in records:
        row = table.setdefault(key(record), dict.fromkeys(FUNNEL_STAGES, 0))
        row[record["stage"]] += 1
    return table


def size_group(record: dict) -> str:
    """COCO's size of an object: small (area < 32^2), medium (< 96^2) or large."""
    return "small" if record["area"] < 32.0**2 else "medium" if record["area"] < 96.0**2 else "large"


# ---- the training dashboard --------------------------------------------------------------------

DASHBOARD_IMAGES = 32  # validation images the dashboard reads after each epoch: it costs about 3 predictions an image
LOSS_NAMES = ("rpn_objectness", "rpn_box", "roi_classifier", "roi_box")


@contextlib.contextmanager
def _untouched(model: nn.Module, device):
    """Run a block without changing the model: its mode, every buffer (BatchNorm's running
    statistics move in a train-mode forward) and the random state that training draws from
    (sampling, multi-scale resizing, the data loader's seed) are as they were afterwards."""
    was_training = model.training
    buffers = [b.detach().clone() for b in model.buffers()]
    devices = [device] if torch.device(device).type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        model.train(was_training)


def epoch_dashboard(model: "FasterRCNN", dataset, *, device, batch_size: int = 4) -> dict:
    """What to watch after each epoch besides AP, on `dataset` (metrics.json keeps it per epoch):

        val_losses      the four losses, computed as training computes them (train mode: the train
                        top-N proposals, RoI sampling, BatchNorm on the batch), averaged over images
        rpn_recall      the share of objects with a proposal at IoU >= 0.5 among the RPN's kept
                        top-N in eval mode: an object without one cannot be detected (the funnel)
        gt_share        the share of ground-truth boxes among the positive RoIs the box head trains
                        on (sample_rois joins them): near 1, the RPN finds nothing yet
        roi_levels      how many sampled RoIs pool from P2, P3, P4, P5 (the level mapper)

    Without gradients, and leaving the model as it was (_untouched): weights, buffers, mode, RNG.
    The train-mode pass is FasterRCNN.forward's, one part at a time, to read the sampled RoIs.
    """
    loader = make_data_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    sums, num_images = dict.fromkeys(LOSS_NAMES, 0.0), 0
    num_objects = found = positives = gt_positives = 0
    levels = torch.zeros(4, dtype=torch.int64)
    heads = model.roi_heads
    with _untouched(model, device):
        # first the recall of the kept proposals, as the detector runs them (eval mode, test top-N),
        # before the train-mode pass moves BatchNorm's running statistics
        model.eval()
        backbone = inference_backbone(model) if model.fused_inference else model.backbone
        for images, targets in loader:
            images = [img.to(device) for img in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in trainable_targets(targets)]
            batch, image_sizes, resized = model.transform(images, targets)
            proposals, _, _ = model.rpn(batch.shape[-2:], image_sizes, backbone(batch))
            for props, target in zip(proposals, resized):
                num_objects += len(target["boxes"])
                if len(target["boxes"]) and len(props):
                    found += int((box_iou(target["boxes"].to(props), props).max(dim=1).values >= 0.5).sum())
        model.train()
        for images, targets in loader:
            images = [img.to(device) for img in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in trainable_targets(targets)]
            batch, image_sizes, resized = model.transform(images, targets)  # (N, 3, H, W)
            features = model.backbone(batch)
            proposals, _, losses = model.rpn(batch.shape[-2:], image_sizes, features, resized)
            rois, labels, gt_deltas = heads.sample_rois(proposals, resized)
            class_logits, box_deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features[:4], rois,
                                                                                              image_sizes)))
            losses.update(heads.loss(class_logits, box_deltas, labels, gt_deltas))
            for name in LOSS_NAMES:  # per-batch means, weighted by the images in the batch
                sums[name] += losses[name].item() * len(images)
            num_images += len(images)
            is_positive = (labels > 0).split([len(r) for r in rois])
            for rois_i, pos, target in zip(rois, is_positive, resized):
                gt_boxes = target["boxes"].to(rois_i)
                is_gt = (rois_i[:, None, :] == gt_boxes[None]).all(-1).any(-1)  # (R_i,) a joined gt box
                positives += int(pos.sum())
                gt_positives += int((pos & is_gt).sum())
            scales = heads.box_roi_pool.level_scales(features[:4], image_sizes)
            k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
            levels += torch.bincount(heads.box_roi_pool.map_levels(torch.cat(rois), k_min, k_max).cpu(),
                                     minlength=4)[:4]
    return {"val_losses": {name: s / max(num_images, 1) for name, s in sums.items()},
            "rpn_recall": found / num_objects if num_objects else -1.0,
            "gt_share": gt_positives / positives if positives else -1.0,
            "roi_levels": levels.tolist()}


# =============================================================================================
# Appendix: speed and parity
# =============================================================================================
# batched_nms_by_category — torchvision's batched_nms above 1000 boxes (batched_nms calls it)
# roi_align_fast — roi_align for all RoIs at once (MultiScaleRoIAlign calls it)
# folded_backbone, inference_backbone — the folded, channels_last backbone an eval-mode
#     FasterRCNN runs (FasterRCNN.forward calls inference_backbone)
# fused_copy — a whole inference copy of a FasterRCNN (FasterRCNN.fuse)
"""Appendix. Code that exists only to be fast, or only to agree with torchvision to the last
bit where the readable versions above would agree to a rounding error or up to the order of
exactly equal scores. Each piece is reached through one name, called from one place, and
tested equal to the version a notebook explains (tests/test_speed_paths.py).
"""


def batched_nms_by_category(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, *,
                            max_keep: int | None = None) -> Tensor:
    """batched_nms the way torchvision.ops.batched_nms does it above 1000 boxes on a CPU: nms
    on each category's boxes as they are (no offsets, so every IoU is rounded as torchvision
    rounds it), then all kept boxes, in index order, sorted by score with torchvision's
    unstable sort, which puts exactly equal scores in an order of its own. Training samples
    RoIs by position, so the order matters for parity of the losses.

    With max_keep each category stops at its best max_keep boxes. Without equal scores among
    the boxes that can rank up to the last one kept, there is one order, (score, index), and
    it is torchvision's; with them, the whole kept set is needed after all, to sort it as
    torchvision does.
    """
    def kept_in_index_order(limit):  # -> (kept indices, sorted; whether every category ran to the end)
        per_category = [idx[nms(boxes[idx], scores[idx], iou_threshold, max_keep=limit)]
                        for idx in (torch.where(idxs == c)[0] for c in torch.unique(idxs))]
        complete = limit is None or all(len(k) < limit for k in per_category)
        return torch.cat(per_category).sort().values, complete

    if max_keep == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    keep, complete = kept_in_index_order(max_keep)
    if not complete:
        keep = keep[torch.sort(scores[keep], descending=True, stable=True)[1]][:max_keep]
        contenders = scores[scores >= scores[keep[-1]]]
        if len(torch.unique(contenders)) == len(contenders):
            return keep
        keep, _ = kept_in_index_order(None)
    return keep[scores[keep].sort(descending=True)[1]][:max_keep]  # torchvision's call, unstable


def roi_align_fast(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                   aligned: bool = False, *, out: Tensor | None = None, out_rows: Tensor | None = None) -> Tensor:
    """roi_align's numbers (same arguments), for all RoIs at once, a few hundred at a time.

    out, out_rows: write RoI i's output into out[out_rows[i]] and return `out` (so that
    MultiScaleRoIAlign fills one tensor for all levels without a second copy of it); rows of
    RoIs that average nothing (aligned=True and zero size) are set to 0.

    Every output number is a weighted sum of input pixels: out[r, :, i, j] = sum over the
    bin's samples and each sample's 4 bilinear taps of weight * input[n, :, y, x], with
    weight = (y weight * x weight) / samples per bin. F.embedding_bag computes exactly such
    sums (rows of a table, with a weight per row, summed per "bag"), in one fused kernel and
    without materialising the taps: the table is the channels-last view of the map, one
    row of C numbers per pixel, and each bin is a bag of samples * 4 rows.
    """
    rois = boxes_to_rois(boxes) if isinstance(boxes, (list, tuple)) else boxes
    out_h, out_w = _pair(output_size)
    num_rois, (n, c, height, width) = rois.shape[0], input.shape
    if out is None:
        out = input.new_zeros((num_rois, c, out_h, out_w))
        out_rows = torch.arange(num_rois, device=input.device)
    if num_rois == 0:
        return out
    # the geometry in at least float32: half precision cannot place a sample within a pixel
    rois = rois.to(torch.promote_types(input.dtype, torch.float32))
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    roi_w, roi_h = rois[:, 3] * spatial_scale - offset - x1, rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((num_rois,), sampling_ratio, dtype=torch.int64, device=rois.device)
    else:
        grid_h = torch.ceil(roi_h / out_h).to(torch.int64).clamp(min=0)
        grid_w = torch.ceil(roi_w / out_w).to(torch.int64).clamp(min=0)

    # (N*H*W, C) with rows contiguous: a free view of a channels_last map, else one copy
    table = input.permute(0, 2, 3, 1).reshape(n * height * width, c).contiguous()
    # RoIs that share a sample grid are done together: one group when sampling_ratio > 0.
    grids = torch.stack([grid_h, grid_w], dim=1)
    for gh, gw in torch.unique(grids, dim=0).tolist():
        members = torch.where((grids[:, 0] == gh) & (grids[:, 1] == gw))[0]
        if gh == 0 or gw == 0:  # an empty RoI (aligned=True, zero size) averages nothing: 0
            out[out_rows[members]] = 0
            continue
        # about 256k taps at a time: the index tensors stay small, and so does each piece
        chunk = max(1, (1 << 18) // (out_h * out_w * gh * gw * 4))
        for idx in members.split(chunk):
            r = len(idx)
            # sample coordinates (r, out*g): bin start + (i + 0.5) * bin / g, as torchvision orders it
            iy = torch.arange(out_h * gh, device=rois.device)
            ix = torch.arange(out_w * gw, device=rois.device)
            ys = (y1[idx, None] + (iy // gh) * bin_h[idx, None]) + ((iy % gh) + 0.5).to(rois.dtype) * bin_h[idx, None] / gh
            xs = (x1[idx, None] + (ix // gw) * bin_w[idx, None]) + ((ix % gw) + 0.5).to(rois.dtype) * bin_w[idx, None] / gw
            y_lo, y_hi, wy_lo, wy_hi = _bilinear_taps(ys, height)   # (r, SY)
            x_lo, x_hi, wx_lo, wx_hi = _bilinear_taps(xs, width)    # (r, SX)
            # bag layout (r, out_h, out_w, gh, gw, 2 y taps, 2 x taps): one bag per output bin
            rows = torch.stack([y_lo, y_hi], dim=-1).reshape(r, out_h, 1, gh, 1, 2, 1)
            cols = torch.stack([x_lo, x_hi], dim=-1).reshape(r, 1, out_w, 1, gw, 1, 2)
            wy = torch.stack([wy_lo, wy_hi], dim=-1).reshape(r, out_h, 1, gh, 1, 2, 1)
            wx = torch.stack([wx_lo, wx_hi], dim=-1).reshape(r, 1, out_w, 1, gw, 1, 2)
            image = rois[idx, 0].to(torch.int64).reshape(r, 1, 1, 1, 1, 1, 1)
            pixel = (image * height + rows) * width + cols                    # row of `table`
            weight = wy * wx / (gh * gw)                                       # mean over the bin's samples
            val = F.embedding_bag(pixel.reshape(r * out_h * out_w, -1), table, mode="sum",
                                  per_sample_weights=weight.reshape(r * out_h * out_w, -1).to(input.dtype))
            out[out_rows[idx]] = val.reshape(r, out_h, out_w, c).permute(0, 3, 1, 2)  # (r, C, out_h, out_w)
    return out


def folded_backbone(backbone: BackboneWithFPN) -> BackboneWithFPN:
    """An inference copy of a backbone: BatchNorm folded into the convolutions
    (ResNet.fold_batchnorm), weights in channels_last (so every feature map is too: the layout
    the CPU's convolutions and roi_align_fast's gathers run fastest in), eval mode, no
    gradients. Features equal the backbone's up to float rounding: folding and the layout
    reorder sums (detections move by less than 1e-2 px)."""
    from copy import deepcopy
    with torch.inference_mode(False):  # real tensors, even when first called under inference_mode
        folded = deepcopy(backbone).eval().requires_grad_(False)
        folded.body.fold_batchnorm()
        return folded.to(memory_format=torch.channels_last)


def _weights_key(module: nn.Module) -> tuple:
    """Changes whenever a weight does: in place (an optimiser step, load_state_dict, any `x.mul_`
    under no_grad bumps a tensor's version), or replaced (.to(), a new device or dtype). Tensors
    made under torch.inference_mode keep no version: only their replacement counts."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype)
                 for t in (*module.parameters(), *module.buffers()))


def inference_backbone(model: "FasterRCNN") -> BackboneWithFPN:
    """The folded_backbone that an eval-mode FasterRCNN runs, cached on the model: built on first
    use after model.eval(), rebuilt when a backbone weight changed since (see _weights_key),
    dropped by model.train() (FasterRCNN.train). The rest of the model (transform, RPN, RoI
    heads and their settings) is the model's own. Weights changed through `.data` are
    invisible here: call model.eval() again after such a change."""
    key = _weights_key(model.backbone)
    cached = model.__dict__.get("_inference_backbone")
    if cached is None or cached[0] != key:
        model.__dict__.pop("_inference_backbone", None)  # free the stale copy before building the new one
        model.__dict__["_inference_backbone"] = cached = (key, folded_backbone(model.backbone))
    return cached[1]


def fused_copy(model: "FasterRCNN") -> "FasterRCNN":
    """A whole, independent inference copy of a FasterRCNN (FasterRCNN.fuse): its backbone
    folded (folded_backbone), every weight channels_last, eval mode, no gradients."""
    from copy import deepcopy
    with torch.inference_mode(False):
        fused = deepcopy(model).eval().requires_grad_(False)
        fused.fused_inference = False  # its backbone is folded already
        fused.backbone.body.fold_batchnorm()
        return fused.to(memory_format=torch.channels_last)


# =============================================================================================
# 09 deployment: one ONNX file, pixels in, detections out; onnxruntime; predict --onnx
# =============================================================================================
# ONNX_OPSET — the opset the export writes (RoiAlign's coordinate_transformation_mode needs 16)
# nms_per_class — NMS within each class, our nms when run, ONNX NonMaxSuppression when exported
# roi_align_onnx — roi_align_fast when run, ONNX RoiAlign when exported
# ExportableDetector — one image through a FasterRCNN's own parts, every size a tensor
# export_onnx — FasterRCNN -> model.onnx (dynamic H and W, class names in the metadata)
# OnnxDetector — an exported file in onnxruntime: image -> {"boxes", "scores", "labels"}
"""Section 09. An exported graph is what one run of the model did, written down as operators.
The TorchScript exporter (torch.onnx.export(dynamo=False)) runs the model once on an example
image and records every tensor operation; Python control flow (if, for, min of two numbers)
is not recorded, only the branch it took. Sizes stay symbolic only while they stay tensors:
while tracing, `x.shape[i]` is a 0-dim tensor, and arithmetic on it becomes Shape, Div, Floor
operators; `int()`, `.tolist()` or Python's `min()` freeze the example's numbers into the graph.

    image        float32 [3, H, W], RGB in 0..1, H and W dynamic
    boxes        float32 [N, 4] xyxy in the input's pixels; scores float32 [N]; labels int64 [N] (1..K)

FasterRCNN.forward handles a batch of images of any size with Python lists and loops; this
section runs one image through the same parts (backbone, RPN head, anchors, box coder, box head,
predictor) with every size computed as a tensor. Two operations have no fixed-size form at all:
NMS (how many boxes survive depends on the boxes) and RoIAlign over a data-dependent number of
RoIs. Each is a small torch custom operator (_deployment_ops) that runs this module's code (nms,
roi_align_fast) in PyTorch and whose ONNX symbolic writes ONNX's own operator (NonMaxSuppression,
RoiAlign, opset ONNX_OPSET); the tracer records a custom operator as one node, never its insides.
tests/test_deployment.py checks ExportableDetector and onnxruntime against FasterRCNN.

Speed: onnxruntime runs the convolutions and the box head faster than PyTorch on a CPU, but its
RoiAlign loops over channels one plane at a time (a quarter of its time on ResNet50-FPN at 320 px,
against 2% for roi_align_fast); formulating RoIAlign as gathers or as GridSample instead was slower
still in onnxruntime.
"""

ONNX_OPSET = 17


def _nms_per_class_impl(boxes: Tensor, class_scores: Tensor, iou_threshold: float, max_per_class: int) -> Tensor:
    """boxes (B, 4), class_scores (C, B) with -1 where a box is not of that class ->
    selected (M, 2) rows (class, box index), class by class, each class by decreasing score."""
    selected = [torch.zeros((0, 2), dtype=torch.int64, device=boxes.device)]
    for c, scores in enumerate(class_scores):
        idx = torch.where(scores >= 0)[0]
        keep = idx[nms(boxes[idx], scores[idx], iou_threshold, max_keep=max_per_class)]
        selected.append(torch.stack([torch.full_like(keep, c), keep], dim=1))
    return torch.cat(selected)


def _nms_per_class_symbolic(g, boxes, class_scores, iou_threshold, max_per_class):
    """ONNX NonMaxSuppression: boxes (1, B, 4), scores (1, C, B) -> (M, 3) rows (image, class, box)."""
    from torch.onnx import symbolic_helper
    iou_threshold = symbolic_helper._parse_arg(iou_threshold, "f")
    max_per_class = symbolic_helper._parse_arg(max_per_class, "i")
    const = lambda *v, dtype=torch.int64: g.op("Constant", value_t=torch.tensor(v, dtype=dtype))
    selected = g.op("NonMaxSuppression", g.op("Unsqueeze", boxes, const(0)), g.op("Unsqueeze", class_scores, const(0)),
                    const(max_per_class), const(iou_threshold, dtype=torch.float32),
                    # a box takes part in a class when its score passes -0.5: every real score does
                    const(-0.5, dtype=torch.float32), center_point_box_i=0)
    return g.op("Slice", selected, const(1), const(3), const(1))          # (M, 2): class, box


def _roi_align_impl(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int,
                    aligned: bool) -> Tensor:
    return roi_align_fast(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


def _roi_align_symbolic(g, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """ONNX RoiAlign (mode "avg"): features (N, C, H, W), boxes (R, 4), batch indices (R,) int64."""
    from torch.onnx import symbolic_helper
    size = symbolic_helper._parse_arg(output_size, "i")
    const = lambda *v: g.op("Constant", value_t=torch.tensor(v))
    batch_idx = g.op("Cast", g.op("Squeeze", g.op("Slice", rois, const(0), const(1), const(1)), const(1)),
                     to_i=7)  # 7: INT64
    boxes = g.op("Slice", rois, const(1), const(5), const(1))
    # 'half_pixel' shifts boxes by half a pixel (aligned=True); 'output_half_pixel' is the
    # original RoIAlign (aligned=False), which also makes every RoI at least 1x1
    mode = "half_pixel" if symbolic_helper._parse_arg(aligned, "b") else "output_half_pixel"
    return g.op("RoiAlign", features, boxes, batch_idx, mode_s="avg", output_height_i=size, output_width_i=size,
                sampling_ratio_i=symbolic_helper._parse_arg(sampling_ratio, "i"),
                spatial_scale_f=symbolic_helper._parse_arg(spatial_scale, "f"),
                coordinate_transformation_mode_s=mode)


def _deployment_ops():
    """The two operators as torch custom ops (frcnn_common::nms_per_class, ::roi_align): the
    tracer records each as one node, whose ONNX symbolic writes ONNX's operator. Registered on
    first use, once per process."""
    if not hasattr(torch.ops.frcnn_common, "nms_per_class"):
        for name, impl, symbolic in (("nms_per_class", _nms_per_class_impl, _nms_per_class_symbolic),
                                     ("roi_align", _roi_align_impl, _roi_align_symbolic)):
            torch.library.custom_op(f"frcnn_common::{name}", impl, mutates_args=())
            torch.onnx.register_custom_op_symbolic(f"frcnn_common::{name}", symbolic, ONNX_OPSET)
    return torch.ops.frcnn_common


def nms_per_class(boxes: Tensor, scores: Tensor, labels: Tensor, num_classes: int, iou_threshold: float, *,
                  max_keep: int) -> Tensor:
    """batched_nms's answer (kept indices, by decreasing score, at most max_keep), with NMS run on
    each class's boxes as they are: the form ONNX's NonMaxSuppression computes, one score row per
    class. Scores must be >= 0 (probabilities). Classes are 0..num_classes-1."""
    # (B,) -> (C, B): a box's score in its own class's row, -1 (not taking part) in the others
    rows = torch.arange(num_classes, device=labels.device)[:, None]                   # (C, 1)
    class_scores = torch.where(labels[None, :] == rows, scores[None, :], torch.full_like(scores, -1.0)[None, :])
    selected = _deployment_ops().nms_per_class(boxes, class_scores, float(iou_threshold), int(max_keep))  # (M, 2)
    keep = selected[:, 1]
    # merge the classes by score (exactly equal scores of two classes may come in either order)
    order = torch.sort(scores[keep], descending=True)[1]
    return keep[order][:max_keep]


def roi_align_onnx(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int,
                   aligned: bool = False) -> Tensor:
    """roi_align's numbers (rois (R, 5), output (R, C, S, S)), exported as ONNX RoiAlign."""
    return _deployment_ops().roi_align(features, rois, int(output_size), float(spatial_scale), int(sampling_ratio),
                                       bool(aligned))


class ExportableDetector(nn.Module):
    """A FasterRCNN's inference on one image, written so that tracing keeps every size symbolic:
    image (3, H, W) in 0..1 -> boxes (N, 4), scores (N,), labels (N,), the model's detections.

    Its parts are the model's own (the folded backbone eval mode runs, the RPN head, the anchor
    generator's cells, the box coders, the box head and predictor, with their settings); only
    the glue between them is written again, per image, with sizes as tensors.
    """

    def __init__(self, model: "FasterRCNN"):
        super().__init__()
        model = model.eval()
        self.backbone = inference_backbone(model) if model.fused_inference else model.backbone
        self.transform, self.rpn, self.roi_heads = model.transform, model.rpn, model.roi_heads
        self.num_classes = model.num_classes
        # 1/stride of P2..P5: fixed by the backbone, whatever the image size (level_scales)
        with torch.no_grad():
            probe = self.backbone(torch.zeros(1, 3, 64, 64))
        self.level_scales = self.roi_heads.box_roi_pool.level_scales(probe[:4], [(64, 64)])
        self.eval()  # (a new module trains; the export puts a module back in the mode it found)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        original_size = torch._shape_as_tensor(image)[1:]                      # (2,) int64: H, W
        batch, size = self.preprocess(image, original_size)                    # (1, 3, H', W'), (2,)
        features = self.backbone(batch)                                        # P2..P6
        proposals = self.propose(batch, size, features)                        # (R, 4)
        boxes, scores, labels = self.detect(features[:4], proposals, size)
        ratio = original_size.to(torch.float32) / size.to(torch.float32)       # (2,): H, W
        boxes = boxes * torch.stack([ratio[1], ratio[0], ratio[1], ratio[0]])  # back to input pixels
        return boxes, scores, labels

    def preprocess(self, image: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
        """DetectionTransform for one image: normalise, resize (the scale from H and W, in
        float64 as Python computes it), zero-pad to a multiple of 32."""
        t = self.transform
        mean = torch.tensor(t.image_mean, dtype=image.dtype)[:, None, None]
        std = torch.tensor(t.image_std, dtype=image.dtype)[:, None, None]
        image = (image - mean) / std
        hw = size.to(torch.float64)                                            # (2,)
        # (1,)-shaped float64 tensors throughout: the exporter treats 0-dim tensors and Python
        # numbers as scalars and writes their arithmetic in float32, which rounds 256/200*200 to 255
        min_size, max_size = (torch.tensor([float(s)], dtype=torch.float64) for s in (t.min_size[-1], t.max_size))
        scale = torch.minimum(min_size / hw.amin(0, keepdim=True), max_size / hw.amax(0, keepdim=True))  # (1,)
        new_size = torch.floor(hw * scale).to(torch.int64)                     # (2,)
        resized = F.interpolate(image[None], size=[new_size[0], new_size[1]], mode="bilinear",
                                align_corners=False)
        pad = (-new_size) % t.size_divisible                                   # (2,) zeros to add
        return F.pad(resized, [0, pad[1], 0, pad[0]]), new_size

    def propose(self, batch: Tensor, size: Tensor, features) -> Tensor:
        """RegionProposalNetwork at inference, one image: top-k per level, decode, sigmoid,
        clip, drop tiny boxes, NMS within each level, the best post_nms_top_n."""
        rpn = self.rpn
        logits, deltas = rpn.head(features)
        batch_hw = torch._shape_as_tensor(batch)[2:]
        boxes, scores, levels = [], [], []
        for level, (lg, dl, cell) in enumerate(zip(logits, deltas, rpn.anchor_generator.cell_anchors)):
            grid = torch._shape_as_tensor(lg)[2:]                              # (2,) H_l, W_l
            stride = torch.div(batch_hw, grid, rounding_mode="floor")
            anchors = rpn.anchor_generator.grid_anchors((grid[0], grid[1]), (stride[0], stride[1]), cell)
            lg, dl = flatten_head_outputs([lg], [dl])                          # (1, P_l), (1, P_l, 4)
            k = torch.clamp(torch._shape_as_tensor(lg)[1], max=rpn.pre_nms_top_n[False])
            top_logits, top = lg[0].topk(k)                                    # (k,)
            boxes.append(rpn.box_coder.decode(dl[0, top], anchors[top])[:, 0])  # (k, 4)
            scores.append(top_logits.sigmoid())
            levels.append(torch.full_like(top, level))
        boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
        boxes = self.clip(boxes, size)
        keep = remove_small_boxes(boxes, rpn.min_size)
        keep = keep[scores[keep] >= rpn.score_thresh]
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = nms_per_class(boxes, scores, levels, len(logits), rpn.nms_thresh, max_keep=rpn.post_nms_top_n[False])
        return boxes[keep]

    def detect(self, features, proposals: Tensor, size: Tensor):
        """RoIHeads at inference, one image: RoIAlign from each RoI's level, box head, then
        RoIHeads.postprocess's steps."""
        heads, pool = self.roi_heads, self.roi_heads.box_roi_pool
        k_min = int(-math.log2(self.level_scales[0]))
        levels = pool.map_levels(proposals, k_min, k_min + len(features) - 1)   # (R,)
        rois = torch.cat([torch.zeros_like(proposals[:, :1]), proposals], dim=1)  # (R, 5)
        pooled, order = [], []
        for level, (feature, scale) in enumerate(zip(features, self.level_scales)):
            idx = torch.where(levels == level)[0]
            pooled.append(roi_align_onnx(feature, rois[idx], pool.output_size, scale, pool.sampling_ratio))
            order.append(idx)
        # rows back in the proposals' order: level by level -> argsort of where each came from
        roi_features = torch.cat(pooled)[torch.argsort(torch.cat(order))]      # (R, C, 7, 7)
        class_logits, box_deltas = heads.box_predictor(heads.box_head(roi_features))  # (R, K), (R, K*4)
        boxes = self.clip(heads.box_coder.decode(box_deltas, proposals), size)   # (R, K, 4)
        scores = F.softmax(class_logits, dim=-1)                                 # (R, K)
        labels = torch.arange(self.num_classes).expand_as(scores)
        # drop the background column, then one row per (RoI, class)
        boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
        keep = torch.where(scores > heads.score_thresh)[0]
        keep = keep[remove_small_boxes(boxes[keep], 1e-2)]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = nms_per_class(boxes, scores, labels, self.num_classes, heads.nms_thresh,
                             max_keep=heads.detections_per_img)
        return boxes[keep], scores[keep], labels[keep]

    @staticmethod
    def clip(boxes: Tensor, size: Tensor) -> Tensor:
        """clip_boxes_to_image with the size (H, W) a tensor: x to [0, W], y to [0, H]."""
        hw = size.to(boxes.dtype)
        upper = torch.stack([hw[1], hw[0], hw[1], hw[0]])                      # (4,)
        return torch.minimum(boxes.clamp(min=0), upper)


def export_onnx(model: "FasterRCNN", path, *, class_names=None, example_size: tuple[int, int] = (300, 400)) -> pathlib.Path:
    """Write `model` as one ONNX file (opset ONNX_OPSET): input `image` float32 [3, H, W], RGB
    in 0..1, H and W dynamic; outputs `boxes` [N, 4] xyxy in the input's pixels, `scores` [N],
    `labels` int64 [N] in 1..K. class_names (index = label; default "0".."K-1") travel as JSON
    in the metadata (`class_names`), so does the model's resize setting. The example image only
    drives the trace: any size works afterwards (tests/test_deployment.py)."""
    import onnx
    path = pathlib.Path(path)
    names = [str(i) for i in range(model.num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != model.num_classes:
        raise ValueError(f"{len(names)} class names for a model of {model.num_classes} classes")
    if any(p.device.type != "cpu" for p in model.parameters()):
        from copy import deepcopy
        model = deepcopy(model).cpu()  # the trace runs on the CPU (so does onnxruntime here)
    detector = ExportableDetector(model)
    example = torch.rand(3, *example_size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    outputs = ["boxes", "scores", "labels"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes about tracing; the tests check the result
        torch.onnx.export(detector, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=outputs,
                          dynamic_axes={"image": {1: "height", 2: "width"}, **{o: {0: "detections"} for o in outputs}})
    proto = onnx.load_from_string(buffer.getvalue())
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 4  # boxes [N, 4]: the trace loses the 4
    for key, value in {"class_names": json.dumps(names), "min_size": str(model.transform.min_size[-1]),
                       "max_size": str(model.transform.max_size)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    write_atomic(path, lambda tmp: onnx.save(proto, str(tmp)))
    return path


class OnnxDetector:
    """An exported model in onnxruntime (CPUExecutionProvider), called like an eval-mode
    FasterRCNN: a list of images (3, H, W) -> a list of {"boxes", "scores", "labels"}; so
    predict_images draws and writes its detections as it does a FasterRCNN's. No torch model
    is built. threads: onnxruntime's intra-op threads (default: torch's, so timings compare)."""

    def __init__(self, path, *, threads: int | None = None):
        import onnxruntime as ort
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # threads that spin after a run would take the cores from whatever runs next (PyTorch,
        # interleaved in a benchmark): wait passively, as bench/benchmark.py has OpenMP do
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.class_names = json.loads(self.session.get_modelmeta().custom_metadata_map["class_names"])
        except Exception as err:  # onnxruntime raises its own types; all mean the same here
            raise ValueError(f"{path} is not an ONNX model exported by frcnn_common: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err

    def eval(self) -> "OnnxDetector":
        return self  # always inference

    def __call__(self, images) -> list[dict]:
        detections = []
        for image in images:
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"expected an RGB image (3, H, W), got {tuple(image.shape)}")
            boxes, scores, labels = self.session.run(None, {"image": image.detach().cpu().float().numpy()})
            detections.append({"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores),
                               "labels": torch.from_numpy(labels)})
        return detections


# =============================================================================================
# Prediction, drawing and the CLI: python -m frcnn_common data | train | evaluate | predict | check-data | errors | export
# =============================================================================================
# draw_boxes — an image and its xyxy boxes on a matplotlib axis, boxes on pixel edges
# predict_images — detections on image files, drawn and written as json
# main — python -m frcnn_common data | train | evaluate | predict | check-data | export

def predict_images(model: nn.Module, paths, *, out_dir, class_names, device, score_thresh: float = 0.5,
                   progress: bool = True) -> list[dict]:
    """Detect objects in image files; write OUT/<name>.png with the boxes drawn and return
    [{"image", "boxes", "scores", "labels", "names"}] (boxes xyxy in the image's pixels)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    results = []
    for path in tqdm(paths, desc="predict", disable=not progress):
        image = load_image(path)
        with torch.inference_mode():
            det = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
        keep = det["scores"] >= score_thresh
        det = {k: v[keep] for k, v in det.items()}
        names = [class_names[i] for i in det["labels"].tolist()]
        fig, ax = plt.subplots(figsize=(8, 8 * image.shape[1] / image.shape[2]))
        draw_boxes(ax, image, det["boxes"], [f"{n} {s:.2f}" for n, s in zip(names, det["scores"].tolist())])
        fig.savefig(out_dir / (pathlib.Path(path).stem + ".png"), dpi=100, bbox_inches="tight")
        plt.close(fig)
        results.append({"image": str(path), "boxes": det["boxes"].tolist(), "scores": det["scores"].tolist(),
                        "labels": det["labels"].tolist(), "names": names})
    _write_json_atomic(out_dir / "predictions.json", results)
    return results


def draw_boxes(ax, image: Tensor | None, boxes: Tensor, texts=(), *, color="lime", linewidth: float = 2.0,
               linestyle="-", alpha: float = 1.0, text_color="black", fontsize: float = 8,
               outline: bool = True) -> None:
    """Draw xyxy boxes on a matplotlib axis: over `image` (3, H, W) in 0..1 when given (shown
    with imshow, axis off), else over what the axis shows, drawn with imshow's default extent.

    The pixel-edge convention of notebook 01: a box (x1, y1, x2, y2) is in continuous pixel
    coordinates, where pixel i spans [i, i + 1). imshow centres pixel i on the integer i, so
    its edges are at i - 0.5 and i + 0.5: the rectangle starts at (x1 - 0.5, y1 - 0.5) and is
    x2 - x1 wide and y2 - y1 high. Anything else drawn in box coordinates shifts by -0.5 too.

    texts: a label per box (fewer: the rest unlabelled). color and linestyle: one for all
    boxes, or a list with one per box. outline (the default): a dark halo, a pixel wide, on
    both sides of each box's line, so that a lime box still reads on a lime image.
    """
    import matplotlib.patches
    import matplotlib.patheffects
    if image is not None:
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy())  # (3, H, W) -> (H, W, 3)
        ax.set_axis_off()
    boxes = boxes.tolist()
    colors = color if isinstance(color, list) else [color] * len(boxes)
    linestyles = linestyle if isinstance(linestyle, list) else [linestyle] * len(boxes)
    for i, ((x1, y1, x2, y2), c, style) in enumerate(zip(boxes, colors, linestyles)):
        rect = ax.add_patch(matplotlib.patches.Rectangle(
            (x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=c, linewidth=linewidth,
            linestyle=style, alpha=alpha))
        if outline:
            rect.set_path_effects([matplotlib.patheffects.Stroke(linewidth=linewidth + 2, foreground="black",
                                                                 alpha=0.8 * alpha),
                                   matplotlib.patheffects.Normal()])
        if i < len(texts) and texts[i]:
            ax.text(x1 - 0.5, y1 - 1.5, texts[i], color=text_color, fontsize=fontsize, va="bottom",
                    bbox=dict(facecolor=c, alpha=0.85, pad=1, edgecolor="none"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m frcnn_common",
                                     description="Faster R-CNN from scratch: data, train, evaluate, predict, check-data.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="build the embedded shapes dataset (idempotent)")
    p.add_argument("--root", default=None, help="where to build it (default: data/shapes in the repository)")
    p.add_argument("--num-train", type=int, default=TrainConfig.num_train)
    p.add_argument("--num-val", type=int, default=TrainConfig.num_val)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even when a complete build exists")

    def data_args(p):
        p.add_argument("--data", choices=["shapes", "coco", "voc"], default=None)
        p.add_argument("--data-root", default=None, help="dataset folder (default: the profile's)")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    p = sub.add_parser("train", help="train a detector")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    data_args(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/<profile>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from a trained model: a checkpoint of ours, a torchvision "
                        "fasterrcnn_resnet50_fpn .pth, or 'torchvision' (its COCO weights, downloaded); "
                        "the box predictor starts afresh when the classes differ")
    p.add_argument("--freeze-backbone-epochs", type=int, default=0, metavar="N",
                   help="keep the backbone (ResNet + FPN) frozen for the first N epochs")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("check-data", help="check your own COCO or VOC folder before training")
    p.add_argument("--data", choices=["coco", "voc"], required=True)
    p.add_argument("--data-root", required=True, help="the dataset folder")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                   help="whose image size and anchors the fit is measured with")

    p = sub.add_parser("evaluate", help="COCO metrics of a checkpoint on a validation set")
    p.add_argument("--checkpoint", required=True)
    data_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--errors", action="store_true", help="also TIDE's error types and their dAP (section 08)")

    p = sub.add_parser("errors", help="TIDE's error types of any COCO results file against a COCO ground truth")
    p.add_argument("--gt", required=True, help="COCO ground truth (instances_*.json)")
    p.add_argument("--dets", required=True, help="COCO results file: [{image_id, category_id, bbox, score}, ...]")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    p = sub.add_parser("predict", help="detect objects in images")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint")
    model.add_argument("--onnx", metavar="MODEL_ONNX", help="a model that export wrote, run in onnxruntime")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default=None, help="output folder (default: runs/predict)")
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--device", default=None)

    p = sub.add_parser("export", help="write a checkpoint as one ONNX file (pixels in, detections out)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, metavar="MODEL_ONNX")
    return parser


def _from_working_directory(args: argparse.Namespace) -> None:
    """Every path given on the command line is relative to the working directory, as in any CLI;
    the defaults (None here) stay relative to the repository root, resolved where they are used."""
    for name in ("root", "data_root", "out", "checkpoint"):
        if getattr(args, name, None) is not None:
            setattr(args, name, pathlib.Path(getattr(args, name)).absolute())
    if getattr(args, "init", None) not in (None, "torchvision"):
        args.init = pathlib.Path(args.init).absolute()
    # image paths are opened as they are given (from here), and predictions.json names them so


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _from_working_directory(args)
    if getattr(args, "epochs", None) is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1 (got {args.epochs})")
    if args.command == "data":
        build_shapes_dataset(resolve(args.root or "data/shapes"), seed=args.seed, num_train=args.num_train,
                             num_val=args.num_val, force=args.force)
        return 0
    if args.command == "check-data":   # exit status 1 when the report lists errors
        cfg = PROFILES[args.profile]
        try:
            check_before_training(args.data, resolve(args.data_root), cfg)
        except DataCheckFailed as err:
            print(err, file=sys.stderr)
            return 1
        return 0
    if args.command == "train":
        cfg = PROFILES[args.profile]
        if args.data:
            cfg = replace(cfg, data=args.data)
        elif args.profile == "full" and (resolve("data/coco") / "annotations").is_dir():
            cfg = replace(cfg, data="coco", data_root="data/coco")  # COCO 2017 where the user has it
            print("full profile: training on COCO 2017 in data/coco")
        if args.epochs:
            cfg = replace(cfg, epochs=args.epochs)
        try:
            train_in_processes(cfg, out_dir=args.out or f"runs/{args.profile}", resume=args.resume,
                               device=args.device, data_root=args.data_root, progress=not args.no_progress,
                               init=args.init, freeze_backbone_epochs=args.freeze_backbone_epochs)
        except (TrainingDiverged, TrainingProcessFailed) as err:
            print(f"training stopped: {err}", file=sys.stderr)
            return 1
        return 0
    if args.command == "errors":
        result = errors_from_files(resolve(args.gt), resolve(args.dets))
        print(format_errors(result))
        if args.json:
            print(json.dumps({k: result[k] for k in ("AP50", "errors", "fp_dAP", "fn_dAP")}))
        return 0
    if args.command == "predict" and args.onnx:   # onnxruntime alone: no torch model is built
        detector = OnnxDetector(args.onnx)
        predict_images(detector, args.images, out_dir=resolve(args.out), class_names=detector.class_names,
                       device="cpu", score_thresh=args.score_thresh)
        print(f"wrote {len(args.images)} image(s) and predictions.json to {resolve(args.out)}")
        return 0
    if args.command == "export":
        model, ckpt = load_checkpoint(args.checkpoint)
        try:
            path = export_onnx(model, resolve(args.out), class_names=ckpt["class_names"])
        except OSError as err:
            raise ValueError(f"cannot write {args.out}: {err.strerror or err}") from None
        print(f"wrote {path} (opset {ONNX_OPSET}; input image [3, H, W], outputs boxes, scores, labels)")
        return 0
    device = torch.device(args.device) if args.device else DEVICE
    model, ckpt = load_checkpoint(args.checkpoint, device)
    if args.command == "evaluate":
        cfg = TrainConfig(**ckpt["config"])
        if args.data:
            cfg = replace(cfg, data=args.data)
        _, val_set = make_datasets(cfg, data_root=args.data_root)
        metrics = evaluate_model(model, subset(val_set, cfg.max_val_images), device=device,
                                 return_predictions=args.errors)
        if list(val_set.class_names) != list(ckpt["class_names"]):
            print("warning: the dataset's classes differ from the checkpoint's", file=sys.stderr)
        summary = {k: metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "images", "seconds")}
        for key, value in summary.items():
            print(f"{key:>8}: {value:.4f}" if isinstance(value, float) else f"{key:>8}: {value}")
        if args.errors:
            summary["errors"] = error_analysis(metrics["predictions"], metrics["targets"],
                                               class_names=val_set.class_names)
            print(format_errors(summary["errors"]))
        if args.json:
            print(json.dumps(summary))
        return 0
    out = resolve(args.out or "runs/predict")
    predict_images(model, args.images, out_dir=out, class_names=ckpt["class_names"], device=device,
                   score_thresh=args.score_thresh)
    print(f"wrote {len(args.images)} image(s) and predictions.json to {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, DatasetError, ValueError) as err:  # bad input: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
