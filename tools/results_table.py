"""Write README's results sections from the files that training runs write, never by hand.

    python tools/results_table.py results [runs/cpu/metrics.json] [--timings T]
    python tools/results_table.py side-by-side [bench/side_by_side.json]

`results`: the `cpu` profile's run (notebook 05, or `python -m frcnn_common train --profile cpu`),
from its metrics.json: the profile's model and recipe, processes and steps, the AP table per
epoch, seconds of training, the machine and the date the run finished; and, from the notebook
runner's build/notebooks/timings.json when it holds a whole `cpu` series, the wall time of
`make run`. `make results` runs it, and `make run` calls `make results`.

`side-by-side`: bench/train_side_by_side.py's result (ours against torchvision's detection heads
on the same backbone, recipe, data and seed), which that script writes to bench/side_by_side.json.
`make side-by-side` runs the script, then this.

Each section ends with a hidden line naming the fingerprint of the `cpu` profile and of the
embedded dataset it was measured with (tools/results_guard.py); the tests fail when the code
no longer matches it. A metrics.json trained with other settings than the `cpu` profile now has
is refused, naming the settings that differ.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
from dataclasses import asdict

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import frcnn_common as fc  # noqa: E402
from tools.results_guard import COMMITTED_PROFILE, fingerprint_line  # noqa: E402
from tools.readme_section import replace_section  # noqa: E402

README = ROOT / "README.md"
COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import torch
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__.split('+')[0]}"


def check_config(config: dict, source) -> None:
    """Refuse a run whose settings are not the `cpu` profile's as the code now defines it."""
    current = json.loads(json.dumps(asdict(fc.PROFILES[COMMITTED_PROFILE])))
    changed = [f"{k} {config.get(k)!r} (now {v!r})" for k, v in current.items() if config.get(k) != v]
    if changed:
        raise SystemExit(f"{source} was not trained with the {COMMITTED_PROFILE} profile as it is now: "
                         + ", ".join(changed) + ". Train again: make run")


def recipe(cfg: fc.TrainConfig, num_classes: int) -> str:
    params = sum(p.numel() for p in fc.build_model(cfg, num_classes).parameters())
    return (f"ResNet-FPN with blocks {tuple(cfg.blocks)}, width {cfg.width}, FPN {cfg.fpn_channels} "
            f"channels, {params / 1e6:.1f}M parameters, trained from scratch; images resized to "
            f"{cfg.min_size}..{cfg.max_size} px, anchors {cfg.anchor_sizes[0]}..{cfg.anchor_sizes[-1]} px; "
            f"{cfg.optimizer} (lr {cfg.lr:g}, {cfg.warmup_iters} warm-up steps, {cfg.schedule} decay)")


def ap_table(first: str, rows: dict) -> list[str]:
    """A Markdown table of COLUMNS and training seconds, one row per {label: metrics}."""
    lines = [f"| {first} | " + " | ".join(COLUMNS) + " | training s |", "|---:|" + "---:|" * (len(COLUMNS) + 1)]
    return lines + [f"| {label} | " + " | ".join(f"{m[k]:.3f}" for k in COLUMNS) + f" | {m['train_seconds']:,.0f} |"
                    for label, m in rows.items()]


def render_results(metrics: dict, *, date: str, make_run_seconds: float | None = None,
                   load_at_start: float | None = None) -> str:
    cfg = fc.TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in metrics["config"].items()})
    epochs = metrics["epochs"]
    if not epochs:
        raise SystemExit("metrics.json holds no finished epoch")
    processes = metrics.get("processes", 1)
    final = epochs[-1]
    lines = [
        f"Measured on {date} on this project's CPU machine ({machine()}), with the `cpu` profile: "
        f"{recipe(cfg, len(metrics['class_names']))}; {cfg.epochs} epochs of the {cfg.num_train:,} "
        f"embedded training images, {processes} process{'es' if processes > 1 else ''} x "
        f"{cfg.batch_size} images a step ({metrics['total_steps']:,} steps). Evaluated with pycocotools "
        f"on the {cfg.num_val} validation images after every epoch:",
        "",
        *ap_table("epoch", {e["epoch"]: e for e in epochs}),
    ]
    summary = (f"Command: `make run` (notebook 05 calls `fc.train`, as `python -m frcnn_common train "
               f"--profile cpu` does): {metrics['train_seconds']:,.0f} s of training (validation not "
               f"counted); final AP {final['AP']:.3f}, AP50 {final['AP50']:.3f}, AP75 {final['AP75']:.3f}.")
    if make_run_seconds is not None:
        summary += f" The whole series, this training included, ran in {make_run_seconds / 60:,.1f} minutes."
        if load_at_start is not None:
            summary += (f" Load average when `make run` started: {load_at_start:.2f}"
                        + (" (a quiet machine)." if load_at_start < 0.5 else
                           " (not a quiet machine: these times are not for the record)."))
    return "\n".join(lines + ["", summary, fingerprint_line()]) + "\n"


def render_side_by_side(result: dict) -> str:
    cfg = fc.TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in result["config"].items()})
    names = {"ours": "ours (frcnn_common)", "torchvision": "torchvision's RPN and RoI heads"}
    full = result["profile_config"]["epochs"]
    epochs = (f"{cfg.epochs} epochs" if cfg.epochs == full else
              f"{cfg.epochs} epochs (the profile trains {full}; the learning-rate schedule fitted to {cfg.epochs})")
    lines = [
        f"Measured on {result['date']} on {result['machine']}: the `cpu` profile's backbone, recipe, data "
        f"and seed on both sides, trained as `fc.train_in_processes` trains it ({cfg.cpu_processes} "
        f"process{'es' if cfg.cpu_processes > 1 else ''} x {cfg.batch_size} images a step), {epochs}; "
        f"only the detection machinery differs: ours (anchors, RPN, RoIAlign, RoI "
        f"heads, all from scratch) against torchvision's (`GeneralizedRCNNTransform`, `RegionProposalNetwork`, "
        f"`MultiScaleRoIAlign`, `RoIHeads`). Final epoch, pycocotools on the {cfg.num_val} validation images:",
        "",
        *ap_table("detector", {label: result[key] for key, label in names.items()}),
        "",
        f"Command: `{result['command']}`." + (
            f" Load average when it started: {result['load_at_start']:.2f}"
            + (" (a quiet machine)." if result["load_at_start"] < 0.5 else
               " (not a quiet machine: the times are not for the record)." )
            if "load_at_start" in result else ""),
        fingerprint_line(),
    ]
    return "\n".join(lines) + "\n"


def write_section(name: str, body: str, readme: pathlib.Path = README) -> None:
    readme.write_text(replace_section(readme.read_text(), name, body))
    print(f"{readme.name}: section '{name}' rewritten")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("results", "side-by-side"))
    parser.add_argument("source", type=pathlib.Path, nargs="?", help="the run's file (default: see above)")
    parser.add_argument("--timings", type=pathlib.Path, default=ROOT / "build/notebooks/timings.json",
                        help="the notebook runner's timings (default: build/notebooks/timings.json)")
    parser.add_argument("--readme", type=pathlib.Path, default=README)
    args = parser.parse_args(argv)
    if args.what == "results":
        source = args.source or ROOT / "runs" / COMMITTED_PROFILE / "metrics.json"
        if not source.is_file():
            raise SystemExit(f"{source} not found: train first (make run)")
        metrics = json.loads(source.read_text())
        check_config(metrics["config"], source)
        make_run_seconds = load_at_start = None
        if args.timings.is_file():
            timings = json.loads(args.timings.read_text())
            if timings.get("profile") == COMMITTED_PROFILE and timings.get("complete"):
                make_run_seconds, load_at_start = timings["total_seconds"], timings.get("load_at_start")
        date = datetime.date.fromtimestamp(source.stat().st_mtime).isoformat()
        write_section("results", render_results(metrics, date=date, make_run_seconds=make_run_seconds,
                                                load_at_start=load_at_start), args.readme)
    else:
        source = args.source or ROOT / "bench" / "side_by_side.json"
        if not source.is_file():
            raise SystemExit(f"{source} not found: run make side-by-side")
        result = json.loads(source.read_text())
        check_config(result["profile_config"], source)
        write_section("side_by_side", render_side_by_side(result), args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
