"""Train our detector and torchvision's with the same recipe, side by side, and report both APs.

Same backbone (our ResNet-FPN of the profile's size, since torchvision's ResNet cannot be made
that narrow), same data, same steps, same seed, same training loop run the same way
(frcnn_common.train_in_processes: the profile's DDP processes on a CPU): only the detection
machinery differs, ours (anchors, RPN, RoIAlign heads, all from scratch) against
torchvision's (its GeneralizedRCNNTransform, RPN, MultiScaleRoIAlign and RoIHeads).

    python bench/train_side_by_side.py --profile cpu [--epochs N] [--out runs/side_by_side]
    make side-by-side          # the same for the cpu profile, then README's side-by-side table

Prints a table and one JSON line: {"ours": {...}, "torchvision": {...}, "epochs": N, ...}; with the
`cpu` profile it also writes that to bench/side_by_side.json, which tools/results_table.py turns
into README's table (--epochs N: both sides train N epochs, the schedule fitted to N).
"""
import argparse
import datetime
import json
import os
import pathlib
import sys
from collections import OrderedDict
from dataclasses import asdict, replace

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import frcnn_common as fc  # noqa: E402


class DictFeatures(nn.Module):
    """Our backbone, returning the OrderedDict of levels that torchvision's heads expect."""

    def __init__(self, backbone: fc.BackboneWithFPN):
        super().__init__()
        self.inner, self.out_channels = backbone, backbone.out_channels

    def forward(self, x):
        return OrderedDict(zip(["0", "1", "2", "3", "pool"], self.inner(x)))


class RenamedLosses(nn.Module):
    """torchvision's detector under our loss names, so the same training loop logs it."""

    names = {"loss_objectness": "rpn_objectness", "loss_rpn_box_reg": "rpn_box",
             "loss_classifier": "roi_classifier", "loss_box_reg": "roi_box"}

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def roi_heads(self) -> nn.Module:
        """The wrapped detector's second stage, where train_one_epoch looks for what it logs."""
        return self.model.roi_heads

    def forward(self, images, targets=None):
        out = self.model(images, targets)
        return {self.names[k]: v for k, v in out.items()} if self.training else out


def torchvision_detector(cfg: fc.TrainConfig, num_classes: int) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    ours = fc.build_model(cfg, num_classes)  # the same backbone, built and initialised the same way
    channels = ours.backbone.out_channels
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes))
    model = FasterRCNN(
        DictFeatures(ours.backbone), num_classes=None, min_size=cfg.min_size, max_size=cfg.max_size,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, canonical_scale=cfg.roi_canonical_size,
                                        canonical_level=cfg.roi_canonical_level),  # the profile's level mapper
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_batch_size_per_image=cfg.box_batch_size_per_image, box_detections_per_img=cfg.box_detections_per_img,
        box_head=TwoMLPHead(channels * 7 * 7, cfg.representation_size),
        box_predictor=FastRCNNPredictor(cfg.representation_size, num_classes))
    return RenamedLosses(model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(fc.PROFILES), default="cpu")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", default="runs/side_by_side")
    args = parser.parse_args(argv)
    profile_cfg = fc.PROFILES[args.profile]
    # Both sides train as the CLI does (train_in_processes: the cpu profile's DDP processes); the
    # torchvision detector travels to the other processes pickled, with the same initial weights.
    cfg = profile_cfg
    if args.epochs:
        cfg = replace(cfg, epochs=args.epochs)
    out = fc.resolve(args.out)
    num_classes = len(fc.make_datasets(cfg)[0].class_names)
    results = {}
    load_at_start = round(os.getloadavg()[0], 2)   # timings for the record want a quiet machine
    for name, model in (("ours", None), ("torchvision", "tv")):
        torch.manual_seed(cfg.seed)  # the same initial weights on both sides
        model = torchvision_detector(cfg, num_classes) if model == "tv" else None
        metrics = fc.train_in_processes(cfg, out_dir=out / name, model=model)
        last = metrics["epochs"][-1]
        results[name] = {k: last[k] for k in fc.COCO_METRIC_KEYS} | {"train_seconds": metrics["train_seconds"]}
    print(f"\n{'':12} {'AP':>6} {'AP50':>6} {'AP75':>6} {'train s':>8}")
    for name, r in results.items():
        print(f"{name:12} {r['AP']:6.3f} {r['AP50']:6.3f} {r['AP75']:6.3f} {r['train_seconds']:8.0f}")
    from tools.results_table import machine
    command = "python bench/train_side_by_side.py --profile " + args.profile + (f" --epochs {args.epochs}" if args.epochs else "")
    summary = {**results, "epochs": cfg.epochs, "profile": args.profile, "command": command,
               "date": datetime.date.today().isoformat(), "machine": machine(), "load_at_start": load_at_start,
               "config": json.loads(json.dumps(asdict(cfg))),
               "profile_config": json.loads(json.dumps(asdict(profile_cfg)))}
    print(json.dumps(summary))
    if args.profile == "cpu":  # README's table says how many epochs it is
        fc._write_json_atomic(ROOT / "bench" / "side_by_side.json", summary, indent=1)
        print(f"wrote {ROOT / 'bench' / 'side_by_side.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
