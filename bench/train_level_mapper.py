"""Train the detector with two canonical sizes of the level mapper, side by side, and report both APs.

The level mapper (Lin et al., 2017, Eq. 1) sends a RoI of roi_canonical_size px to P4 and one
level finer per halving. torchvision's 224 suits 800 px images with 32..512 px anchors; the `cpu`
profile's images are about a third that size and its anchors half, so with 224 most of its RoIs
pool from P2. This trains the profile with each canonical size, everything else equal (same seed,
same initial weights, same data, same schedule, the same training loop run the same way:
frcnn_common.train_in_processes), and writes both APs to bench/level_mapper.json, which notebook
04 prints beside the profile's choice.

    python bench/train_level_mapper.py [--sizes 224 112] [--epochs N] [--seed S] [--out runs/level_mapper]

With --epochs N both sides train N epochs, the schedule fitted to N. The json is rewritten after
each training, so a run cut short keeps the sides that finished.
"""
import argparse
import datetime
import json
import pathlib
import sys
from dataclasses import asdict, replace

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import frcnn_common as fc  # noqa: E402

JSON = ROOT / "bench" / "level_mapper.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(fc.PROFILES), default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 112])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None, help="instead of the profile's (another draw)")
    parser.add_argument("--out", default="runs/level_mapper")
    parser.add_argument("--json", default=str(JSON))
    args = parser.parse_args(argv)
    profile_cfg = fc.PROFILES[args.profile]
    cfg = replace(profile_cfg, epochs=args.epochs or profile_cfg.epochs,
                  seed=profile_cfg.seed if args.seed is None else args.seed)
    out = fc.resolve(args.out)
    from tools.results_table import machine
    command = (f"python bench/train_level_mapper.py --profile {args.profile} --sizes "
               + " ".join(map(str, args.sizes)) + (f" --epochs {args.epochs}" if args.epochs else "")
               + (f" --seed {args.seed}" if args.seed is not None else ""))
    results = {}
    for size in args.sizes:
        side = replace(cfg, roi_canonical_size=size)
        torch.manual_seed(side.seed)  # the same initial weights on both sides
        metrics = fc.train_in_processes(side, out_dir=out / str(size))
        last = metrics["epochs"][-1]
        results[str(size)] = ({k: last[k] for k in fc.COCO_METRIC_KEYS}
                              | {"train_seconds": metrics["train_seconds"]})
        shared = json.loads(json.dumps(asdict(cfg)))
        shared.pop("roi_canonical_size")  # the one setting that differs
        summary = {"canonical_size": results, "canonical_level": cfg.roi_canonical_level, "epochs": cfg.epochs,
                   "profile": args.profile, "command": command,
                   "date": datetime.date.today().isoformat(), "machine": machine(),
                   "config": shared}
        fc._write_json_atomic(pathlib.Path(args.json), summary, indent=1)  # after each side: a cut run keeps it
    print(f"\n{'s0':>5} {'AP':>6} {'AP50':>6} {'APs':>6} {'APm':>6} {'APl':>6} {'train s':>8}")
    for size, r in results.items():
        print(f"{size:>5} {r['AP']:6.3f} {r['AP50']:6.3f} {r['APs']:6.3f} {r['APm']:6.3f} {r['APl']:6.3f}"
              f" {r['train_seconds']:8.0f}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
