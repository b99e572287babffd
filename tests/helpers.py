"""Helpers that several test files share (not a test file: pytest collects nothing here)."""
import os
import subprocess
import sys

import torch

import frcnn_common as fc


def run_cli(*args, timeout=600, cwd=fc.ROOT):
    """`python -m frcnn_common ARGS` in a subprocess with one thread; its output captured."""
    env = dict(os.environ, PYTHONPATH=str(fc.ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "frcnn_common", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def trained_scale_(model):
    """Scale a random detector's box-regression weights to a trained model's size (x0.02 the box
    head, x0.1 the RPN, as SPEC.md says: a random model's huge deltas amplify rounding through
    exp()) and make class 1 confident enough to be detected. Ours and torchvision's name these
    layers alike. In place; returns the model."""
    with torch.no_grad():
        predictor = model.roi_heads.box_predictor
        predictor.bbox_pred.weight.mul_(0.02)
        predictor.bbox_pred.bias.mul_(0.02)
        model.rpn.head.bbox_pred.weight.mul_(0.1)
        model.rpn.head.bbox_pred.bias.mul_(0.1)
        predictor.cls_score.bias[1] += 8.0
    return model


def random_torchvision_detector(**sizes):
    """torchvision's fasterrcnn_resnet50_fpn, randomly initialised (seed 0), in eval mode, scaled by
    trained_scale_."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    torch.manual_seed(0)
    return trained_scale_(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91,
                                                  **sizes).eval())
