"""Speed, memory and FLOPs of our Faster R-CNN against torchvision's fasterrcnn_resnet50_fpn,
side by side, with the same weights and the same inputs.

    python bench/benchmark.py                      # 400 and 800 px, 5 runs, CPU
    python bench/benchmark.py --quick              # a smoke pass: one small size, 2 runs
    python bench/benchmark.py --device cuda --amp  # on a GPU, bf16 autocast
    python bench/benchmark.py --inference-only     # no training step
    python bench/benchmark.py --no-onnx            # without ours in onnxruntime (section 09)

What it measures, and how:
- Models. torchvision's detector is built as it is with pretrained weights (ResNet50-FPN,
  FrozenBatchNorm, the stem and layer1 frozen), randomly initialised (nothing is downloaded),
  and its state dict is loaded into ours with load_torchvision_state_dict. As in
  tests/test_detector.py, the box-regression weights are scaled to a trained model's size
  (x0.02 box head, x0.1 RPN) and one class's bias is raised, so that the models detect
  something and the outputs can be compared.
- Variants. "torchvision"; "ours": the default path, what fc.FasterRCNN runs with nothing
  called for speed: for inference the model in eval mode, which runs a folded copy of its
  backbone (BatchNorm folded into the convolutions, channels_last), for training the model in
  channels_last, as fc.train puts it (TrainConfig.channels_last); "ours plain": the readable
  path, in torchvision's order of arithmetic: for inference fused_inference=False, for
  training the model as built.
- Time. One process, the variants interleaved run by run (a shared CPU drifts; interleaving
  gives every variant the same drift), after one warm-up run, median of --runs runs.
  Inference: one image (a real photo) under torch.inference_mode, ms per image.
  Training: one step at batch 2 = forward + backward + SGD step, the same seed (so the
  same sampled anchors and RoIs) for every variant.
- Memory. CPU: a fresh subprocess per variant (glibc told to return every block of 64 kB or
  more to the kernel when it is freed) builds the model, resets the kernel's
  resident-memory high-water mark (/proc/self/clear_refs), runs twice (the first run's
  one-time allocations, such as the optimizer's momentum, count too) and reports the peak
  resident memory above the resident memory before the runs: what inference (or training)
  needs on top of the model itself, allocator overheads included ("ours" builds its folded
  backbone before: like the weights, it is the model's, made once). CUDA: the same with
  torch.cuda.max_memory_allocated.
- FLOPs. torch.utils.flop_counter.FlopCounterMode over one inference (convolutions and
  matrix products; the rest is memory-bound). Achieved GFLOP/s = FLOPs / median time, also
  as a fraction of this machine's measured peak: the best of ten large fp32 matmuls, in this
  process, taken at the start, between inference and training, and at the end.
- Denormals. A randomly initialised detector's training gradients underflow into denormal
  floats, which x86 CPUs handle in slow microcode: without flushing them to zero, a
  training step measures that penalty (2x here, on both models alike) more than either
  implementation. So the benchmark flushes denormals (torch.set_flush_denormal, which only
  changes numbers below 1e-38); --keep-denormals measures with them.
- Parity. Before timing, ours plain and ours must give torchvision's detections: the same
  labels, scores within 1e-4, boxes within 1e-3 px (ours plain, torchvision's arithmetic
  order) and 1e-2 px (ours, whose folding and layout reorder float sums). Training: the same
  four losses within 1e-4 relative (ours plain) and 1e-3 (ours, channels_last: reordered sums).

- Deployment (CPU, unless --no-onnx). "ours onnxruntime": ours exported with fc.export_onnx
  (one export per size: the resize size is part of the graph) and run by fc.OnnxDetector in
  onnxruntime's CPUExecutionProvider, its intra-op threads set to torch's. Timed in the same
  interleaved rounds as the others, after the same warm-up; its detections must be ours
  (boxes within 1e-2 px, scores within 1e-4). Its table goes to bench/deploy_results.md.

It prints a table, writes it to bench/results.md (machine and date named), and ends with one
JSON line: the ratios (ours / torchvision time, speedup, memory ratio) and the machine.
"""
from __future__ import annotations

import os

# A shared CPU: OpenMP threads that spin while they wait for work take the cores from the
# other processes (and from each other), which turns every small parallel op into a
# scheduler round trip. Passive waiting makes timings steadier for both models alike.
# Set before torch loads its OpenMP runtime; export OMP_WAIT_POLICY to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as torchvision_resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import frcnn_common as fc  # noqa: E402

BOX_ATOL = {"ours plain": 1e-3,  # px: the arithmetic runs in torchvision's order
            "ours": 1e-2}        # px: folded BatchNorm and channels_last reorder float sums
SCORE_ATOL = 1e-4
LOSS_RTOL = {"ours plain": 1e-4, "ours": 1e-3}  # the first training step's losses, relative
LOSS_NAMES = {"rpn_objectness": "loss_objectness", "rpn_box": "loss_rpn_box_reg",
              "roi_classifier": "loss_classifier", "roi_box": "loss_box_reg"}
VARIANTS = ("torchvision", "ours plain", "ours")
ONNX = "ours onnxruntime"


# ---------------------------------------------------------------------------------- models

def build_torchvision(seed: int = 0) -> torch.nn.Module:
    """fasterrcnn_resnet50_fpn as torchvision builds it with pretrained weights, randomly
    initialised, its box regression scaled to a trained model's size."""
    torch.manual_seed(seed)
    backbone = torchvision_resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                               norm_layer=TorchvisionFrozenBatchNorm2d, trainable_layers=3)
    model = TorchvisionFasterRCNN(backbone, num_classes=91)
    with torch.no_grad():
        predictor = model.roi_heads.box_predictor
        predictor.bbox_pred.weight.mul_(0.02)
        predictor.bbox_pred.bias.mul_(0.02)
        model.rpn.head.bbox_pred.weight.mul_(0.1)
        model.rpn.head.bbox_pred.bias.mul_(0.1)
        predictor.cls_score.bias[1] += 8.0  # class 1 confident enough to be detected
    return model


def build_ours(state_dict: dict) -> fc.FasterRCNN:
    """Our default FasterRCNN (frozen BatchNorm, stem and layer1 frozen) with those weights."""
    return fc.FasterRCNN(91).load_torchvision_state_dict(state_dict)


def set_min_size(model, size: int) -> None:
    """Both transforms keep the short side in a tuple `min_size` (max_size stays 1333)."""
    model.transform.min_size = (size,)


def inference_variants(torchvision_model, ours) -> dict:
    """ours in eval mode is the default path (a folded backbone); the plain path is a second model."""
    from copy import deepcopy
    plain = deepcopy(ours).eval()
    plain.fused_inference = False
    return {"torchvision": torchvision_model.eval(), "ours plain": plain, "ours": ours.eval()}


def training_variants(torchvision_model, ours) -> dict:
    from copy import deepcopy
    fast = deepcopy(ours).to(memory_format=torch.channels_last)  # as fc.train puts it
    return {"torchvision": torchvision_model, "ours plain": ours, "ours": fast}


# ---------------------------------------------------------------------------------- inputs

def inference_image() -> torch.Tensor:
    return fc.sample_photo()  # Grace Hopper, 600 x 512 (H x W)


def training_batch():
    """Two images with boxes (a photo and a crop of it), targets as the detector takes them."""
    photo = fc.sample_photo()
    images = [photo, photo[:, 60:460, 40:].contiguous()]  # 600 x 512 and 400 x 472
    targets = [{"boxes": torch.tensor([[120.0, 60.0, 400.0, 500.0], [20.0, 300.0, 150.0, 500.0]]),
                "labels": torch.tensor([1, 7])},
               {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0], [200.0, 100.0, 410.0, 350.0]]),
                "labels": torch.tensor([3, 90])}]
    return images, targets


def to_device(images, targets, device):
    images = [img.to(device) for img in images]
    targets = None if targets is None else [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images, targets


# ---------------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def time_interleaved(calls: dict, runs: int, device: torch.device) -> dict:
    """calls: name -> function of no arguments. One warm-up call each, then `runs` rounds,
    each calling every function once, in turn. Returns name -> list of ms."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(runs):
        for name, fn in calls.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def inference_call(model, images, device, amp):
    def call():
        with torch.inference_mode(), autocast(device, amp):
            return model(images)
    return call


def training_step_call(model, optimizer, images, targets, device, amp, seed: int = 7):
    def call():
        torch.manual_seed(seed)  # the same sampled anchors and RoIs for every variant
        with autocast(device, amp):
            losses = model(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return {k: v.detach() for k, v in losses.items()}
    return call


def make_optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)


def matmul_peak_gflops(device: torch.device, dtype=torch.float32, n: int = 2048, runs: int = 10) -> float:
    """GFLOP/s of a large square matmul (2 n^3 FLOPs), the best of `runs`: a peak is what the
    machine can do when nothing else holds it back."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = time_interleaved({"mm": lambda: a @ b}, runs, device)["mm"]
    return 2 * n**3 / (min(times) / 1000) / 1e9


def count_flops(model, images, device, amp) -> int:
    with FlopCounterMode(display=False) as counter:
        inference_call(model, images, device, amp)()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------- parity

def same_detections(det: dict, ref: dict, box_atol: float) -> tuple[bool, float, float]:
    """Each of our detections has a twin in the reference, one to one: the same label, the
    box within box_atol px, the score within SCORE_ATOL (scores compared in order, since
    torchvision orders exactly tied scores with an unstable sort). Returns (ok, largest
    box difference, largest score difference)."""
    if len(det["boxes"]) != len(ref["boxes"]) or len(ref["boxes"]) == 0:
        return False, float("inf"), float("inf")
    dist = torch.cdist(det["boxes"].float(), ref["boxes"].float(), p=float("inf"))
    dist[det["labels"][:, None] != ref["labels"][None, :]] = float("inf")
    dist[(det["scores"][:, None] - ref["scores"][None, :]).abs() > SCORE_ATOL] = float("inf")
    best, twin = dist.min(dim=1)
    score_diff = (det["scores"] - ref["scores"]).abs().max().item()
    ok = best.max().item() <= box_atol and len(set(twin.tolist())) == len(twin) and score_diff <= SCORE_ATOL
    return ok, best.max().item(), score_diff


# ---------------------------------------------------------------------------------- memory

def peak_memory_mb(variant: str, mode: str, size: int, weights: pathlib.Path, device: torch.device,
                   amp: bool, child_args: list[str]) -> float | None:
    """Peak memory of one inference or training step above the memory before it (see the
    module docstring). CPU: in a fresh subprocess, so that nothing else lives in its heap."""
    if device.type == "cuda":
        return _measure_memory(variant, mode, size, weights, device, amp)
    cmd = [sys.executable, __file__, "--memory-child", variant, mode, str(size), str(weights), *child_args]
    # glibc keeps freed blocks below its mmap threshold (which grows up to 32 MB) in the
    # heap, where they stay resident: returning every block of 64 kB or more to the kernel
    # at free makes resident memory follow the memory in use, run after run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"memory measurement of {variant} {mode} {size} failed:\n{out.stderr[-2000:]}")
        return None
    return float(out.stdout.strip().splitlines()[-1])


def _resident_kb(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure_memory(variant: str, mode: str, size: int, weights: pathlib.Path, device: torch.device,
                    amp: bool) -> float:
    import gc
    torchvision_model = build_torchvision().to(device)
    torchvision_model.load_state_dict(torch.load(weights, weights_only=True))
    ours = build_ours(torchvision_model.state_dict()).to(device)
    variants = (inference_variants if mode == "inference" else training_variants)(torchvision_model, ours)
    model = variants[variant]
    del variants, torchvision_model, ours
    gc.collect()
    set_min_size(model, size)
    if mode == "inference":
        images, _ = to_device([inference_image()], None, device)
        call = inference_call(model, images, device, amp)
        if isinstance(model, fc.FasterRCNN) and model.fused_inference:
            fc.inference_backbone(model)  # made once, like the weights: not part of an inference
    else:
        model.train()
        images, targets = to_device(*training_batch(), device)
        call = training_step_call(model, make_optimizer(model), images, targets, device, amp)
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call(), call()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = _resident_kb("VmRSS")
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (VmHWM)
    call(), call()
    return (_resident_kb("VmHWM") - before) / 1024


# ---------------------------------------------------------------------------------- report

def machine_info(device: torch.device, flush_denormals: bool) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "flush_denormals": flush_denormals,
            "device": str(device), "load_at_start": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def fmt(x, digits=0):
    return "n/a" if x is None else f"{x:,.{digits}f}"


def markdown_report(args, machine, date, peak, inference, training, memory, flops, parity_lines) -> str:
    lines = [f"### Ours against torchvision's fasterrcnn_resnet50_fpn",
             "",
             f"{date}; {machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch threads, "
             f"{machine['device']}{', ' + machine['gpu'] if 'gpu' in machine else ''}; torch {machine['torch']}, "
             f"torchvision {machine['torchvision']}; OMP_WAIT_POLICY={machine['omp_wait_policy']}; "
             f"denormals {'flushed' if machine['flush_denormals'] else 'kept'}; "
             f"{'bf16 autocast; ' if args.amp else ''}median of {args.runs} interleaved runs after a warm-up; "
             f"measured {'bf16' if args.amp else 'fp32'} matmul peak {peak:,.0f} GFLOP/s; load average "
             f"{machine['load_at_start']} when it started"
             f"{'' if machine['load_at_start'] < 0.5 else ' (not a quiet machine: not timings for the record)'}.",
             "",
             "\"ours\" is the default path: for inference the model in eval mode, which runs a folded copy of "
             "its backbone (BatchNorm folded into the convolutions, channels_last), for training the model in channels_last "
             "as `fc.train` puts it. \"ours plain\" is the readable path in torchvision's order of arithmetic "
             "(`fused_inference=False`; the model as built for training).",
             "",
             "| measurement | torchvision | ours plain | ours | ours / torchvision |",
             "|---|---:|---:|---:|---:|"]
    for size, res in inference.items():
        med = {v: statistics.median(res[v]) for v in VARIANTS}
        lines.append(f"| inference {size} px, ms/image | {fmt(med['torchvision'])} | {fmt(med['ours plain'])} | "
                     f"{fmt(med['ours'])} | {med['ours'] / med['torchvision']:.2f} |")
    if training:
        med = {v: statistics.median(training["times"][v]) for v in VARIANTS}
        lines.append(f"| training step {training['size']} px, batch 2, ms | {fmt(med['torchvision'])} | "
                     f"{fmt(med['ours plain'])} | {fmt(med['ours'])} | {med['ours'] / med['torchvision']:.2f} |")
    for key, res in memory.items():
        ratio = (res["ours"] / res["torchvision"]) if res["torchvision"] and res["ours"] else None
        lines.append(f"| peak memory, {key}, MB | {fmt(res['torchvision'])} | {fmt(res['ours plain'])} | "
                     f"{fmt(res['ours'])} | {fmt(ratio, 2)} |")
    for size, res in flops.items():
        med = {v: statistics.median(inference[size][v]) for v in VARIANTS}
        gf = {v: res[v] / 1e9 for v in VARIANTS}
        lines.append(f"| GFLOP per image, {size} px | {fmt(gf['torchvision'], 1)} | {fmt(gf['ours plain'], 1)} | "
                     f"{fmt(gf['ours'], 1)} | {gf['ours'] / gf['torchvision']:.2f} |")
        rate = {v: gf[v] / (med[v] / 1000) for v in VARIANTS}
        lines.append(f"| achieved GFLOP/s, {size} px (fraction of matmul peak) | "
                     + " | ".join(f"{rate[v]:,.0f} ({rate[v] / peak:.0%})" for v in VARIANTS)
                     + f" | {rate['ours'] / rate['torchvision']:.2f} |")
    lines += ["", "Parity (checked before timing):", ""] + [f"- {line}" for line in parity_lines]
    return "\n".join(lines) + "\n"


def deploy_report(machine, date, runs, inference, parity_lines) -> str:
    """README's Deploy table: ours eager, ours in onnxruntime, torchvision eager, as ratios."""
    lines = ["### Ours in onnxruntime against ours and torchvision in PyTorch (eager)", "",
             f"{date}; {machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch thread(s) and as many "
             f"onnxruntime intra-op threads; torch {machine['torch']}, onnxruntime {machine.get('onnxruntime')}; "
             f"the same weights (torchvision's detector, randomly initialised); one process, "
             f"median of {runs} interleaved runs after a warm-up; the 600 x 512 sample photo.", "",
             "| short side | ours eager, ms | ours onnxruntime, ms | torchvision eager, ms | "
             "onnxruntime / ours eager | onnxruntime / torchvision |",
             "|---|---:|---:|---:|---:|---:|"]
    for size, res in inference.items():
        if ONNX not in res:
            continue
        med = {v: statistics.median(res[v]) for v in ("ours", ONNX, "torchvision")}
        lines.append(f"| {size} px | {fmt(med['ours'])} | {fmt(med[ONNX])} | {fmt(med['torchvision'])} | "
                     f"{med[ONNX] / med['ours']:.2f} | {med[ONNX] / med['torchvision']:.2f} |")
    lines += ["", "Parity (checked before timing):", ""] + [f"- {line}" for line in parity_lines if ONNX in line]
    return "\n".join(lines) + "\n"


def time_training(args, torchvision_model, ours, train_size, device, parity_lines) -> dict:
    """One training step: parity of the first step's losses, then time. Returns {"size", "times", "ok"}."""
    ok_all = True
    models = training_variants(torchvision_model, ours)
    images, targets = to_device(*training_batch(), device)
    calls = {}
    for name, model in models.items():
        set_min_size(model, train_size)
        model.train()
        calls[name] = training_step_call(model, make_optimizer(model), images, targets, device, args.amp)
    first = {name: call() for name, call in calls.items()}
    for name in ("ours plain", "ours"):
        diffs = [abs(first[name][k].item() - first["torchvision"][v].item()) / max(abs(first["torchvision"][v].item()), 1e-12)
                 for k, v in LOSS_NAMES.items()]
        ok = max(diffs) <= (1e-2 if args.amp else LOSS_RTOL[name])
        ok_all &= ok
        parity_lines.append(f"training step {train_size} px, {name}: the four losses within "
                            f"{max(diffs):.1e} (relative) of torchvision's: {'OK' if ok else 'MISMATCH'}")
        print(parity_lines[-1])
    training = {"size": train_size, "times": time_interleaved(calls, args.runs, device)}
    print(f"training step {train_size} px, ms: " + ", ".join(
        f"{n} {statistics.median(t):,.0f}" for n, t in training["times"].items()))
    training["ok"] = ok_all
    return training


# ---------------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 800], help="short sides (min_size) to time")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--train-size", type=int, default=None, help="short side of the training step "
                        "(default: the smallest of --sizes)")
    parser.add_argument("--quick", action="store_true", help="smoke pass: --sizes 320 --runs 2")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--inference-only", action="store_true", help="skip the training step")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="do not flush denormal floats to zero (see the module docstring)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results.md",
                        help="where to write the table (default bench/results.md)")
    parser.add_argument("--no-onnx", action="store_true", help="skip ours in onnxruntime")
    parser.add_argument("--deploy-out", type=pathlib.Path, default=ROOT / "bench" / "deploy_results.md",
                        help="where to write the onnxruntime table (default bench/deploy_results.md)")
    parser.add_argument("--memory-child", nargs=4, metavar=("VARIANT", "MODE", "SIZE", "WEIGHTS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.set_flush_denormal(not args.keep_denormals)
    device = torch.device(args.device)

    if args.memory_child:  # a fresh process that measures one variant's peak memory
        variant, mode, size, weights = args.memory_child
        print(_measure_memory(variant, mode, int(size), pathlib.Path(weights), device, args.amp))
        return
    if args.quick:
        args.sizes, args.runs = [320], 2
    train_size = args.train_size or min(args.sizes)
    if args.amp and device.type != "cuda":
        parser.error("--amp needs --device cuda (CPU runs stay fp32)")

    machine = machine_info(device, not args.keep_denormals)
    use_onnx = not args.no_onnx and device.type == "cpu"
    if use_onnx:
        import onnxruntime
        machine["onnxruntime"] = onnxruntime.__version__
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    print(f"{date}  {machine}")
    peak_dtype = torch.bfloat16 if args.amp else torch.float32
    peak = matmul_peak_gflops(device, peak_dtype)
    print(f"{peak_dtype} matmul peak: {peak:,.0f} GFLOP/s")

    torchvision_model = build_torchvision().to(device)
    ours = build_ours(torchvision_model.state_dict()).to(device)
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (torchvision_model, ours)]
    assert trainable[0] == trainable[1], f"different trainable parameters: {trainable}"
    tmp = tempfile.TemporaryDirectory()
    weights = pathlib.Path(tmp.name) / "weights.pt"
    torch.save(torchvision_model.state_dict(), weights)

    # --- inference: parity first, then time and FLOPs at each size
    parity_lines, all_ok = [], True
    inference, flops, memory = {}, {}, {}
    models = inference_variants(torchvision_model, ours)
    images, _ = to_device([inference_image()], None, device)
    for size in args.sizes:
        for model in models.values():
            set_min_size(model, size)
        outputs = {name: inference_call(model, images, device, args.amp)() for name, model in models.items()}
        for name, atol in BOX_ATOL.items():
            ok, box_diff, score_diff = same_detections(outputs[name][0], outputs["torchvision"][0],
                                                       10 * atol if args.amp else atol)
            all_ok &= ok
            parity_lines.append(f"inference {size} px, {name}: {len(outputs[name][0]['boxes'])} detections, "
                                f"boxes within {box_diff:.1e} px, scores within {score_diff:.1e}: "
                                f"{'OK' if ok else 'MISMATCH'}")
            print(parity_lines[-1])
        calls = {name: inference_call(model, images, device, args.amp) for name, model in models.items()}
        if use_onnx:  # ours exported at this size, in onnxruntime with torch's number of threads
            onnx_path = fc.export_onnx(models["ours"], pathlib.Path(tmp.name) / f"ours_{size}.onnx")
            detector = fc.OnnxDetector(onnx_path, threads=torch.get_num_threads())
            ok, box_diff, score_diff = same_detections(detector(images)[0], outputs["ours"][0], BOX_ATOL["ours"])
            all_ok &= ok
            parity_lines.append(f"inference {size} px, {ONNX}: {len(outputs['ours'][0]['boxes'])} detections, "
                                f"boxes within {box_diff:.1e} px of ours, scores within {score_diff:.1e}: "
                                f"{'OK' if ok else 'MISMATCH'}")
            print(parity_lines[-1])
            calls[ONNX] = lambda detector=detector: detector(images)
        inference[size] = time_interleaved(calls, args.runs, device)
        print(f"inference {size} px, ms: " + ", ".join(
            f"{n} {statistics.median(t):,.0f}" for n, t in inference[size].items()))
        flops[size] = {name: count_flops(model, images, device, args.amp) for name, model in models.items()}
    for model in models.values():
        set_min_size(model, 800)
    del models
    peak = max(peak, matmul_peak_gflops(device, peak_dtype))  # a shared machine may have been busy before

    # --- training: parity of the first step's losses, then time
    training = {}
    if not args.inference_only:
        training = time_training(args, torchvision_model, ours, train_size, device, parity_lines)
        all_ok &= training.pop("ok")

    # --- peak memory, each variant measured alone
    if not args.no_memory:
        child_args = ["--threads", str(torch.get_num_threads())] + (["--keep-denormals"] if args.keep_denormals else [])
        for size in args.sizes:
            memory[f"inference {size} px"] = {v: peak_memory_mb(v, "inference", size, weights, device, args.amp,
                                                                child_args) for v in VARIANTS}
            print(f"peak memory, inference {size} px, MB: {memory[f'inference {size} px']}")
        if training:
            key = f"training step {train_size} px"
            memory[key] = {v: peak_memory_mb(v, "training", train_size, weights, device, args.amp, child_args)
                           for v in VARIANTS}
            print(f"peak memory, {key}, MB: {memory[key]}")

    peak = max(peak, matmul_peak_gflops(device, peak_dtype))  # a shared machine may have been busy at the start
    report = markdown_report(args, machine, date, peak, inference, training, memory, flops, parity_lines)
    print()
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"wrote {args.out}")
    if use_onnx:
        deploy = deploy_report(machine, date, args.runs, inference, parity_lines)
        print(deploy)
        args.deploy_out.write_text(deploy)
        print(f"wrote {args.deploy_out}")

    def ratio(a, b):
        return None if a is None or b is None else round(a / b, 3)

    summary = {"date": date, "machine": machine, "matmul_peak_gflops": round(peak, 1), "parity_ok": all_ok,
               "inference": {}, "training": {}, "memory": {}}
    for size, res in inference.items():
        t_ref, t_ours, t_plain = (statistics.median(res[v]) for v in ("torchvision", "ours", "ours plain"))
        summary["inference"][str(size)] = {
            "torchvision_ms": round(t_ref, 1), "ours_plain_ms": round(t_plain, 1), "ours_ms": round(t_ours, 1),
            "ours_over_torchvision_time": ratio(t_ours, t_ref), "speedup": ratio(t_ref, t_ours),
            "ours_plain_over_torchvision_time": ratio(t_plain, t_ref),
            "gflop": round(flops[size]["ours"] / 1e9, 2),
            **({"onnxruntime_ms": round(statistics.median(res[ONNX]), 1),
                "onnxruntime_over_ours_time": ratio(statistics.median(res[ONNX]), t_ours)} if ONNX in res else {}),
            "fraction_of_matmul_peak": round(flops[size]["ours"] / 1e9 / (t_ours / 1000) / peak, 3)}
    if training:
        t_ref, t_ours, t_plain = (statistics.median(training["times"][v]) for v in ("torchvision", "ours", "ours plain"))
        summary["training"] = {"size": train_size, "batch": 2, "torchvision_ms": round(t_ref, 1),
                               "ours_plain_ms": round(t_plain, 1), "ours_ms": round(t_ours, 1),
                               "ours_over_torchvision_time": ratio(t_ours, t_ref), "speedup": ratio(t_ref, t_ours),
                               "ours_plain_over_torchvision_time": ratio(t_plain, t_ref)}
    for key, res in memory.items():
        summary["memory"][key] = {"torchvision_mb": res["torchvision"], "ours_plain_mb": res["ours plain"],
                                  "ours_mb": res["ours"], "ours_over_torchvision": ratio(res["ours"], res["torchvision"])}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
