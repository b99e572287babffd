"""Is data loading the bottleneck? The reader's images/s beside the time of one training step.

Reads the embedded training split through make_data_loader (decode, flip, collate), with no
worker processes and with the default number, then times training steps of the profile's
model on the same batches, in one process:

    python bench/data_loading.py [--profile cpu] [--batches 40] [--steps 10]

Prints a table and one JSON line. The reader keeps up when its images/s exceed the training
step's by a wide margin: workers then prepare the next batch while the model trains.
"""
import argparse
import json
import pathlib
import statistics
import sys
import time
from dataclasses import replace

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import frcnn_common as fc  # noqa: E402


def reader_images_per_second(dataset, *, batch_size, num_workers, batches):
    loader = fc.make_data_loader(dataset, batch_size=batch_size, shuffle=True,
                                 num_workers=num_workers)
    it = iter(loader)
    next(it)                              # starts the workers; not timed
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        batch_images, _ = next(it)
        images += len(batch_images)
    return images / (time.perf_counter() - start)


def training_step_seconds(cfg, dataset, *, steps):
    torch.manual_seed(cfg.seed)
    model = fc.build_model(cfg, len(dataset.class_names)).train()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = fc.make_optimizer(cfg, model)
    loader = fc.make_data_loader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=0)
    batches = [b for _, b in zip(range(steps + 2), loader)]
    times = []
    for i, (images, targets) in enumerate(batches):
        start = time.perf_counter()
        losses = model(images, fc.trainable_targets(targets))
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        if i >= 2:                        # two warm-up steps
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(fc.PROFILES), default="cpu")
    parser.add_argument("--batches", type=int, default=40, help="batches read per reader setting")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed (median)")
    args = parser.parse_args(argv)
    cfg = replace(fc.PROFILES[args.profile], data="shapes")
    train_set, _ = fc.make_datasets(cfg)
    default_workers = 0 if len(train_set) < 64 else min(2, __import__("os").cpu_count() or 1)
    readers = {}
    for workers in sorted({0, default_workers}):
        readers[workers] = reader_images_per_second(train_set, batch_size=cfg.batch_size,
                                                    num_workers=workers, batches=args.batches)
    step = training_step_seconds(cfg, train_set, steps=args.steps)
    train_ips = cfg.batch_size / step
    print(f"profile {args.profile}, batch {cfg.batch_size}, {torch.get_num_threads()} torch threads")
    print("| what | images/s |")
    print("|---|---:|")
    for workers, ips in readers.items():
        print(f"| reader, {workers} worker processes | {ips:,.0f} |")
    print(f"| training step ({step * 1000:,.0f} ms a batch) | {train_ips:,.1f} |")
    print(json.dumps({"profile": args.profile, "batch_size": cfg.batch_size,
                      "reader_images_per_s": {str(k): round(v, 1) for k, v in readers.items()},
                      "train_step_s": round(step, 4), "train_images_per_s": round(train_ips, 2)}))


if __name__ == "__main__":
    main()
