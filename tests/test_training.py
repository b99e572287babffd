"""Section 05 and the CLI: training learns, resumes exactly, survives NaNs, runs under DDP;
evaluate and predict answer as README's public interface says."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

import frcnn_common as fc
from tests.helpers import run_cli

ROOT = pathlib.Path(fc.__file__).resolve().parent
SMOKE = replace(fc.PROFILES["smoke"], num_workers=0)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One uninterrupted 2-epoch smoke run, shared by the tests below."""
    out = tmp_path_factory.mktemp("smoke_run")
    metrics = fc.train(SMOKE, out_dir=out, progress=False)
    return out, metrics


def test_train_writes_checkpoints_and_metrics(smoke_run):
    out, metrics = smoke_run
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    assert not list(out.glob("*.tmp"))  # atomic writes leave nothing behind
    saved = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2]
    steps = SMOKE.epochs * (SMOKE.max_train_images // SMOKE.batch_size)
    assert saved["processes"] == 1 and saved["total_steps"] == steps
    for key in ("rpn_objectness", "rpn_box", "roi_classifier", "roi_box", "lr", "loss", "gt_share"):
        assert len(saved["history"][key]) == steps
    assert all(0.0 <= v <= 1.0 or v == -1 for v in saved["history"]["gt_share"])
    assert all(0.0 <= e["AP50"] <= 1.0 or e["AP50"] == -1 for e in saved["epochs"])
    model, ckpt = fc.load_checkpoint(out / "last.pt")
    assert not model.training and ckpt["epoch"] == 2 and ckpt["class_names"][0] == "__background__"


def test_metrics_json_holds_the_dashboard(smoke_run):
    """Per epoch: training and validation losses, the RPN's recall, the gt share, the RoI levels."""
    out, _ = smoke_run
    for epoch in json.loads((out / "metrics.json").read_text())["epochs"]:
        assert set(epoch["train_losses"]) == set(epoch["val_losses"]) == set(fc.LOSS_NAMES)
        assert all(v >= 0 for v in epoch["val_losses"].values())
        assert 0 <= epoch["rpn_recall"] <= 1 and 0 <= epoch["gt_share"] <= 1
        assert len(epoch["roi_levels"]) == 4 and sum(epoch["roi_levels"]) > 0


def test_resume_ends_with_the_same_weights(tmp_path):
    """Stopped after epoch 1 and resumed == the uninterrupted 2-epoch run, to the last bit
    (deterministic mode on the CPU)."""
    threads = torch.get_num_threads()
    try:
        fc.train(SMOKE, out_dir=tmp_path / "full", progress=False, deterministic=True)
        fc.train(SMOKE, out_dir=tmp_path / "resumed", progress=False, stop_after_epochs=1, deterministic=True)
        assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["epoch"] == 1
        fc.train(SMOKE, out_dir=tmp_path / "resumed", progress=False, resume=True, deterministic=True)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    uninterrupted = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    assert resumed["epoch"] == 2
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert resumed["history"]["loss"] == uninterrupted["history"]["loss"]


def test_lr_schedule_hand_values():
    cfg = replace(SMOKE, warmup_iters=10, schedule="cosine")
    assert fc.lr_factor(cfg, 0, 110) == pytest.approx(0.001)
    assert fc.lr_factor(cfg, 5, 110) == pytest.approx(0.001 + 0.999 * 0.5)
    assert fc.lr_factor(cfg, 10, 110) == pytest.approx(1.0)
    assert fc.lr_factor(cfg, 60, 110) == pytest.approx(0.5)       # half-way through the cosine
    cfg = replace(cfg, schedule="step")
    assert fc.lr_factor(cfg, 72, 108) == pytest.approx(0.1)      # 2/3 of 108 = 72
    assert fc.lr_factor(cfg, 96, 108) == pytest.approx(0.01)     # 8/9 of 108 = 96


def test_model_overfits_one_batch():
    """The smoke of "really trains": 40 steps on one batch cut the loss by more than half."""
    torch.manual_seed(0)
    train_set, _ = fc.make_datasets(SMOKE)
    images, targets = zip(*[train_set[i] for i in range(4)])
    targets = fc.trainable_targets(list(targets))
    model = fc.build_model(SMOKE, len(train_set.class_names)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = sum(model(list(images), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_nan_loss_skips_then_stops_keeping_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    fc.train(SMOKE, out_dir=tmp_path, progress=False, stop_after_epochs=1)
    before = (tmp_path / "last.pt").read_bytes()
    real_forward = fc.FasterRCNN.forward

    def nan_forward(self, images, targets=None):
        out = real_forward(self, images, targets)
        if self.training:  # a poisoned loss: what an exploding step looks like
            out["roi_box"] = out["roi_box"] * float("nan")
        return out

    monkeypatch.setattr(fc.FasterRCNN, "forward", nan_forward)
    with pytest.raises(fc.TrainingDiverged, match="non-finite losses in a row"):
        fc.train(replace(SMOKE, max_bad_steps=3), out_dir=tmp_path, progress=False, resume=True)
    printed = capsys.readouterr().out
    assert "non-finite loss" in printed and "images [" in printed  # names the batch's image ids
    assert (tmp_path / "last.pt").read_bytes() == before
    fc.load_checkpoint(tmp_path / "last.pt")  # still loads


def test_gt_share_counts_the_joined_ground_truth_among_the_positives():
    """Two GT boxes, three proposals: one on the first box (IoU 1), one at IoU 0.6 with it, one on
    background. Every positive is sampled (the fraction allows 16), so 2 of the 4 positives are
    the joined GT boxes: gt_share 0.5. Without positive proposals it is 1."""
    heads = fc.build_model(SMOKE, 7).roi_heads
    gt = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [100.0, 100.0, 140.0, 160.0]]),
          "labels": torch.tensor([1, 2])}
    props = torch.tensor([[10.0, 10.0, 50.0, 50.0], [10.0, 10.0, 50.0, 75.0], [200.0, 0.0, 230.0, 30.0]])
    assert abs(fc.box_iou(props[1:2], gt["boxes"][:1]).item() - 0.615) < 1e-3
    heads.sample_rois([props], [gt])
    assert heads.gt_share == 0.5
    heads.sample_rois([props[2:]], [gt])
    assert heads.gt_share == 1.0


def test_one_non_finite_step_among_good_ones_changes_nothing(monkeypatch):
    """Batches good, poisoned, good: the poisoned step leaves the weights, the optimiser and the
    schedule as they were, and training goes on: the run equals one without that batch."""
    train_set, _ = fc.make_datasets(SMOKE, quiet=True)
    batches = [fc.collate_fn([train_set[i] for i in range(j, j + 2)]) for j in (0, 2, 4)]
    cpu = torch.device("cpu")

    def run(loader, poisoned):
        torch.manual_seed(0)
        model = fc.build_model(replace(SMOKE, norm="frozen"), len(train_set.class_names))
        make_sampling_deterministic(model)
        optimizer = fc.make_optimizer(SMOKE, model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 / (1 + it))
        history = {k: [] for k in ("step", "lr", "rpn_objectness", "rpn_box", "roi_classifier", "roi_box", "loss")}
        real_forward, calls = fc.FasterRCNN.forward, []

        def forward(self, images, targets=None):
            out = real_forward(self, images, targets)
            calls.append(1)
            if len(calls) - 1 in poisoned:
                out["roi_box"] = out["roi_box"] * float("nan")
            return out

        monkeypatch.setattr(fc.FasterRCNN, "forward", forward)
        fc.train_one_epoch(model, loader, optimizer, scheduler, device=cpu, history=history, progress=False)
        monkeypatch.undo()
        return model, optimizer, scheduler, history

    model, optimizer, scheduler, history = run(batches, poisoned={1})
    ref_model, ref_optimizer, ref_scheduler, ref_history = run([batches[0], batches[2]], poisoned=set())
    assert history["step"] == [0, 1] and scheduler.last_epoch == ref_scheduler.last_epoch == 2
    assert history["loss"] == pytest.approx(ref_history["loss"], rel=1e-5)
    for key, value in ref_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    steps = {s["step"].item() for s in optimizer.state_dict()["state"].values()}
    assert steps == {2.0}          # AdamW counted two steps, not three


def test_best_pt_holds_the_best_epoch(tmp_path, monkeypatch):
    """Validation AP 0.2, 0.5, 0.4: best.pt is epoch 2's, last.pt epoch 3's."""
    aps = iter([0.2, 0.5, 0.4])
    monkeypatch.setattr(fc, "evaluate_model", lambda *a, **k: {key: next(aps) if key == "AP" else 0.0
                                                               for key in fc.COCO_METRIC_KEYS})
    fc.train(replace(SMOKE, epochs=3, max_train_images=8), out_dir=tmp_path, progress=False)
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["epoch"] == 2 and best["best_ap"] == 0.5
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 3


def test_backbone_frozen_then_trainable_again(tmp_path, monkeypatch):
    """freeze_backbone_epochs=1: after epoch 1 the backbone is as it started (BatchNorm's running
    statistics aside), after epoch 2 it has changed; the heads change in both."""
    model = fc.build_model(SMOKE, len(fc.SHAPES_CLASSES))
    snapshots = [{k: v.clone() for k, v in model.state_dict().items()}]
    real_end_epoch = fc.end_epoch

    def end_epoch(run, **kwargs):
        snapshots.append({k: v.clone() for k, v in run.model.state_dict().items()})
        real_end_epoch(run, **kwargs)

    monkeypatch.setattr(fc, "end_epoch", end_epoch)
    fc.train(SMOKE, out_dir=tmp_path, progress=False, model=model, freeze_backbone_epochs=1)
    start, epoch1, epoch2 = snapshots
    weights = [k for k in start if k.startswith("backbone.") and "running" not in k and "num_batches" not in k]
    assert weights and all(torch.equal(epoch1[k], start[k]) for k in weights)
    assert all(not torch.equal(epoch2[k], epoch1[k]) for k in weights if k.endswith("conv1.weight"))
    assert not torch.equal(epoch1["rpn.head.conv.weight"], start["rpn.head.conv.weight"])
    assert not torch.equal(epoch2["rpn.head.conv.weight"], epoch1["rpn.head.conv.weight"])


def test_cli_training_diverged_exits_1(tmp_path):
    """TrainingDiverged through `python -m frcnn_common train`: status 1, one line naming last.pt."""
    code = ("import runpy, sys, torch, torch.nn.functional as F\n"
            "real = F.smooth_l1_loss\n"
            "F.smooth_l1_loss = lambda *a, **k: real(*a, **k) * float('nan')\n"
            f"sys.argv = ['frcnn_common', 'train', '--profile', 'smoke', '--out', {str(tmp_path)!r}, '--no-progress']\n"
            "runpy.run_module('frcnn_common', run_name='__main__')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"training stopped: 5 non-finite losses in a row; the last good checkpoint is {tmp_path / 'last.pt'}"


def test_train_one_epoch_is_the_loop(tmp_path):
    """train_one_epoch alone: one optimiser step and one history entry per batch, the schedule
    stepped with it, the losses falling on a batch seen again and again."""
    torch.manual_seed(0)
    train_set, _ = fc.make_datasets(SMOKE)
    images = fc.subset(train_set, 4)
    model = fc.build_model(SMOKE, len(train_set.class_names))
    optimizer = fc.make_optimizer(SMOKE, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    history = {k: [] for k in ("step", "lr", "rpn_objectness", "rpn_box", "roi_classifier", "roi_box", "loss")}
    loader = fc.make_data_loader(images, batch_size=4, shuffle=False, num_workers=0)
    for _ in range(8):
        fc.train_one_epoch(model, loader, optimizer, scheduler, device=torch.device("cpu"), history=history,
                           clip_grad_norm=10.0, progress=False)
    assert history["step"] == list(range(8)) and scheduler.last_epoch == 8
    assert all(len(history[k]) == 8 for k in history)
    assert history["loss"][-1] < 0.7 * history["loss"][0], history["loss"]
    assert model.training


def test_a_model_passed_in_is_trained_as_it_is(tmp_path, monkeypatch):
    """train(model=...) trains that very object: nothing rebuilds it or loads weights into it."""
    cfg = replace(SMOKE, epochs=1)
    model = fc.build_model(cfg, len(fc.SHAPES_CLASSES))
    monkeypatch.setattr(fc, "build_model", lambda *a, **k: pytest.fail("train() built a model of its own"))
    monkeypatch.setattr(fc, "imagenet_resnet50_state_dict", lambda *a, **k: pytest.fail("weights fetched"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fc.train(cfg, out_dir=tmp_path, progress=False, model=model)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)        # trained: this object changed
    saved = torch.load(tmp_path / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(saved[k], after[k].cpu()) for k in after)         # and it is what was saved


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    fc.save_checkpoint({"epoch": 1}, path)

    def dying_save(obj, f, *args, **kwargs):
        pathlib.Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        fc.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 1}


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        fc.load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        fc.load_checkpoint(bad)


# ------------------------------------------------------------------------------------- DDP

def _ddp_worker(rank, world, init_file, images, targets, cfg, state, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = fc.build_model(cfg, 8)
    model.load_state_dict(state)
    make_sampling_deterministic(model)
    net = torch.nn.parallel.DistributedDataParallel(model.train())
    half = len(images) // world
    mine = slice(rank * half, (rank + 1) * half)
    loss = sum(net(images[mine], targets[mine]).values())
    loss.backward()
    if rank == 0:
        torch.save({k: p.grad for k, p in model.named_parameters() if p.grad is not None}, out)
    torch.distributed.destroy_process_group()


def make_sampling_deterministic(model):
    """Every non-ignored anchor and every RoI is sampled (no random draws), and every image
    keeps exactly 50 proposals: each image then weighs the same in every loss's average, so
    averaging two processes' gradients must equal one process's gradient on both halves."""
    for sampler in (model.rpn.sampler, model.roi_heads.sampler):
        sampler.batch_size_per_image, sampler.positive_fraction = 10**9, 1.0
    model.rpn.post_nms_top_n[True] = 50


def test_ddp_two_processes_give_the_same_gradients_as_one(tmp_path):
    cfg = replace(SMOKE, norm="frozen")  # batch statistics would differ between B and 2B images
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 160, 192, generator=g) for _ in range(4)]
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [80.0, 30.0, 150.0, 100.0]])
    targets = [{"boxes": boxes.clone(), "labels": torch.tensor([1, 3])} for _ in range(4)]
    torch.manual_seed(0)
    model = fc.build_model(cfg, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    make_sampling_deterministic(model)
    sum(model.train()(images, targets).values()).backward()
    expected = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), images, targets, cfg, state, str(out)), nprocs=2)
    got = torch.load(out)
    assert set(got) == set(expected)
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, atol=1e-6 + 1e-4 * grad.abs().max().item(), rtol=1e-4)


@pytest.mark.slow
def test_torchrun_two_processes_train(tmp_path):
    """torchrun's two processes train as DDP (half of each step's images each), and end with the
    weights of the same run that train_in_processes starts itself."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "-m", "frcnn_common", "train", "--profile", "smoke", "--out", str(tmp_path / "torchrun"),
                             "--epochs", "1", "--no-progress"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "torchrun" / "metrics.json").read_text())
    assert saved["processes"] == 2 and saved["total_steps"] == SMOKE.max_train_images // (2 * SMOKE.batch_size)
    assert len(saved["history"]["loss"]) == saved["total_steps"]
    torchrun = torch.load(tmp_path / "torchrun" / "last.pt", weights_only=False)["model"]
    threads = torch.get_num_threads()
    try:
        fc.train_in_processes(replace(fc.PROFILES["smoke"], cpu_processes=2, epochs=1), out_dir=tmp_path / "spawned",
                              device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    spawned = torch.load(tmp_path / "spawned" / "last.pt", weights_only=False)["model"]
    assert torchrun.keys() == spawned.keys()
    for key, value in spawned.items():
        torch.testing.assert_close(torchrun[key], value, rtol=1e-5, atol=1e-6, msg=key)



def _train_two_processes(out, **kwargs):
    """A deterministic 2-process smoke run (train_in_processes), leaving this process's
    settings as they were."""
    threads = torch.get_num_threads()
    try:
        return fc.train_in_processes(replace(SMOKE, cpu_processes=2), out_dir=out, device="cpu",
                                     progress=False, deterministic=True, **kwargs)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_process_resume_ends_with_the_same_weights(tmp_path):
    """Each rank draws its own RPN and RoI samples: a checkpoint holds every rank's random state
    and each rank gets its own back, so a 2-process run stopped after epoch 1 and resumed ends
    with the uninterrupted run's weights, tensor for tensor."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    _train_two_processes(tmp_path / "full")
    _train_two_processes(tmp_path / "resumed", stop_after_epochs=1)
    first = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert first["epoch"] == 1 and len(first["rng"]) == 2
    assert not torch.equal(first["rng"][0]["torch"], first["rng"][1]["torch"])  # two different states
    _train_two_processes(tmp_path / "resumed", resume=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    uninterrupted = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    assert resumed["epoch"] == uninterrupted["epoch"] == 2
    assert resumed["model"].keys() == uninterrupted["model"].keys()
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert resumed["history"]["loss"] == uninterrupted["history"]["loss"]


@pytest.mark.slow
def test_cpu_processes_train_as_ddp_without_torchrun(tmp_path, capsys):
    """cfg.cpu_processes = 2 on a CPU: train() spawns the second rank itself and the run is DDP
    (each process half of each step's images), leaving this process's settings as they were."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    threads = torch.get_num_threads()
    cfg = replace(SMOKE, cpu_processes=2, batch_size=2, epochs=1)
    result = fc.train_in_processes(cfg, out_dir=tmp_path, device="cpu")
    assert "training in 2 processes" in capsys.readouterr().out
    assert result["processes"] == 2
    assert result["total_steps"] == len(result["history"]["step"]) == cfg.max_train_images // 4
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["processes"] == 2 and [e["epoch"] for e in saved["epochs"]] == [1]
    assert "WORLD_SIZE" not in os.environ and not torch.distributed.is_initialized()
    assert torch.get_num_threads() == threads
    fc.load_checkpoint(tmp_path / "last.pt")



SCRIPT = """import sys
sys.path.insert(0, {root!r})
from dataclasses import replace
import frcnn_common as fc
cfg = replace(fc.PROFILES["smoke"], cpu_processes=2, num_workers=0, epochs={epochs})
{call}
"""


def run_script(tmp_path, call, *, epochs=2):
    script = tmp_path / "train_smoke.py"
    script.write_text(SCRIPT.format(root=str(ROOT), epochs=epochs, call=call.format(out=str(tmp_path / "out"))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_process_that_never_starts_ends_the_run_at_once(tmp_path):
    """A new user's script without the main guard: the spawned rank cannot start (it imports the
    script again), and the run ends within seconds saying so, instead of rank 0 waiting for it."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    started = time.monotonic()
    process = run_script(tmp_path, 'fc.train_in_processes(cfg, out_dir={out!r}, device="cpu", progress=False)')
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert time.monotonic() - started < 60 and process.returncode != 0
    assert stderr.count("Traceback") == 1, stderr                 # the script's own error, once
    assert "NoneType" not in stderr and "can only join" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("frcnn_common.TrainingProcessFailed: training process 1 ended"), last
    assert 'under `if __name__ == "__main__":`' in last


@pytest.mark.slow
def test_a_process_killed_mid_run_stops_the_others_in_one_line(tmp_path):
    """SIGTERM to rank 1 in epoch 2: rank 0 (here) stops at once with TrainingProcessFailed,
    naming it; last.pt keeps epoch 1."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    out = tmp_path / "run"

    def kill_rank_1_after_epoch_1():
        while not (out / "last.pt").exists():
            time.sleep(0.02)
        for child in mp.active_children():
            os.kill(child.pid, signal.SIGTERM)

    killer = threading.Thread(target=kill_rank_1_after_epoch_1, daemon=True)
    killer.start()
    with pytest.raises(fc.TrainingProcessFailed, match=r"^training process 1 was killed \(SIGTERM\)") as info:
        fc.train_in_processes(replace(SMOKE, cpu_processes=2, epochs=4), out_dir=out, device="cpu", progress=False)
    assert "\n" not in str(info.value)
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] < 4     # it did stop early
    fc.load_checkpoint(out / "last.pt")                                      # and last.pt is whole
    assert not torch.distributed.is_initialized() and "WORLD_SIZE" not in os.environ


@pytest.mark.slow
def test_rank_0_killed_mid_run_stops_the_others_in_one_line(tmp_path):
    """SIGTERM to rank 0 (the script) in epoch 2: rank 1 ends within seconds with one line,
    no gloo traceback."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    process = run_script(tmp_path, 'if __name__ == "__main__":\n'
                                   '    fc.train_in_processes(cfg, out_dir={out!r}, device="cpu", progress=False)',
                         epochs=4)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "out" / "last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        killed = time.monotonic()
        _, stderr = process.communicate(timeout=60)   # returns when rank 1, which shares the pipe, ends
    finally:
        process.kill()
    assert time.monotonic() - killed < 20
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "training process 1 stopped: another process of the run ended"
    fc.load_checkpoint(tmp_path / "out" / "last.pt")


# ------------------------------------------------------------------------------------- CLI

def test_cli_evaluate_json_and_predict(smoke_run, tmp_path):
    out, _ = smoke_run
    result = run_cli("evaluate", "--checkpoint", str(out / "last.pt"), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "images", "seconds"}
    assert summary["images"] == SMOKE.max_val_images
    model, _ = fc.load_checkpoint(out / "last.pt")
    val = fc.make_datasets(SMOKE)[1]
    direct = fc.evaluate_model(model, fc.subset(val, SMOKE.max_val_images), device="cpu", progress=False)
    assert summary["AP"] == pytest.approx(direct["AP"], abs=1e-9)  # the CLI reports what the code computes

    image = sorted(fc.resolve("data/shapes_smoke/val").glob("*.png"))[0]
    with torch.no_grad():
        direct = model([fc.load_image(image)])[0]
    assert len(direct["scores"]) > 4, "the model must detect something for the threshold to bite"
    thresh = direct["scores"].median().item()           # keeps about half of the detections
    result = run_cli("predict", "--checkpoint", str(out / "last.pt"), str(image), "--out", str(tmp_path),
                     "--score-thresh", str(thresh))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / (image.stem + ".png")).is_file()
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions) == 1 and predictions[0]["image"] == str(image)
    got, keep = predictions[0], direct["scores"] >= thresh
    assert 0 < len(got["scores"]) == keep.sum() < len(direct["scores"])
    assert min(got["scores"]) >= thresh
    torch.testing.assert_close(torch.tensor(got["scores"]), direct["scores"][keep], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got["boxes"]), direct["boxes"][keep], rtol=0, atol=1e-3)
    height, width = fc.load_image(image).shape[-2:]
    boxes = torch.tensor(got["boxes"])
    assert (boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert got["labels"] == direct["labels"][keep].tolist() and all(1 <= k < len(val.class_names) for k in got["labels"])
    assert got["names"] == [val.class_names[k] for k in got["labels"]]


def test_cli_errors_are_clear(tmp_path):
    result = run_cli("evaluate", "--checkpoint", str(tmp_path / "nope.pt"))
    assert result.returncode != 0 and "nope.pt" in result.stderr
    result = run_cli("train", "--profile", "bogus")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_cli_evaluate_errors(smoke_run):
    """evaluate --errors adds section 08's error types: those of the same model's predictions."""
    out, _ = smoke_run
    result = run_cli("evaluate", "--checkpoint", str(out / "last.pt"), "--errors", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dAP" in result.stdout  # the table
    errors = json.loads(result.stdout.strip().splitlines()[-1])["errors"]
    model, _ = fc.load_checkpoint(out / "last.pt")
    val = fc.subset(fc.make_datasets(SMOKE)[1], SMOKE.max_val_images)
    direct = fc.error_analysis(*fc.predict_dataset(model, val, device="cpu", progress=False),
                               class_names=val.class_names)
    assert errors["AP50"] == pytest.approx(direct["AP50"], abs=1e-9)
    assert errors["errors"] == direct["errors"]  # JSON round-trips floats exactly


@pytest.mark.parametrize("threshold", [0.05, 0.5])
def test_object_funnel_covers_every_object_once_and_agrees_with_error_analysis(smoke_run, threshold):
    out, _ = smoke_run
    model, _ = fc.load_checkpoint(out / "last.pt")
    val = fc.subset(fc.make_datasets(SMOKE)[1], SMOKE.max_val_images)
    records = fc.object_funnel(model, val, threshold, progress=False)
    targets = [val[i][1] for i in range(len(val))]
    objects = {(i, g) for i, t in enumerate(targets) for g in range(len(t["boxes"])) if not t["iscrowd"][g]}
    assert sorted((r["image"], r["gt"]) for r in records) == sorted(objects)  # each object exactly once
    assert all(r["stage"] in fc.FUNNEL_STAGES for r in records)
    predictions, targets = fc.predict_dataset(model, val, device="cpu", progress=False)
    kept = [{k: v[p["scores"] >= threshold] for k, v in p.items()} for p in predictions]
    tp = fc.error_analysis(kept, targets, return_details=True)["true_positives"]
    assert sum(r["stage"] == "detected" for r in records) == tp


def test_funnel_runs_the_same_computation_as_the_model(smoke_run):
    out, _ = smoke_run
    model, _ = fc.load_checkpoint(out / "last.pt")
    val = fc.make_datasets(SMOKE)[1]
    images, targets = zip(*[val[i] for i in range(3)])
    with torch.no_grad():
        expected = model(list(images))
    detections, stages = fc._funnel_batch(model, list(images), list(targets), 0.5)
    for ours, theirs, stage, target in zip(detections, expected, stages, targets):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(ours[key], theirs[key])
        assert len(stage) == len(target["boxes"])


def test_funnel_blames_the_rpn_when_it_keeps_one_proposal(smoke_run):
    """A planted loss: with the RPN's kept top-N cut to 1 proposal an image, at most one object an
    image can have a proposal on it; every other object is lost in the RPN or later."""
    out, _ = smoke_run
    model, _ = fc.load_checkpoint(out / "last.pt")
    model.rpn.post_nms_top_n[False] = 1
    val = fc.subset(fc.make_datasets(SMOKE)[1], SMOKE.max_val_images)
    records = fc.object_funnel(model, val, 0.05, progress=False)
    per_image = fc.funnel_table(records, key=lambda r: r["image"])
    for image, row in per_image.items():
        assert sum(row.values()) - row["rpn"] <= 1, (image, row)
    assert sum(row["rpn"] for row in per_image.values()) >= len(records) - len(per_image)


def test_cli_paths_are_relative_to_the_working_directory(tmp_path):
    """Run from another folder, every path given on the command line (data --root, --data-root,
    --out, --checkpoint, images) means a path there, as in any CLI; nothing lands in the checkout.
    The same run covers `data`, `train --resume`, and `evaluate --data`."""
    before = set(ROOT.iterdir())
    result = run_cli("data", "--root", "mine", "--num-train", "40", "--num-val", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "mine" / "train").glob("*.png"))) == 40
    train = ("train", "--profile", "smoke", "--data-root", "mine", "--out", "run", "--no-progress")
    result = run_cli(*train, "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["epoch"] == 1
    result = run_cli(*train, "--epochs", "2", "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {tmp_path / 'run' / 'last.pt'} after epoch 1" in result.stdout
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["epoch"] == 2

    result = run_cli("evaluate", "--checkpoint", "run/last.pt", "--data", "shapes", "--data-root", "mine",
                     "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["images"] == SMOKE.max_val_images
    image = sorted((tmp_path / "mine" / "val").glob("*.png"))[0]
    result = run_cli("predict", "--checkpoint", "run/last.pt", f"mine/val/{image.name}", "--out", "predicted",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "predicted" / "predictions.json").is_file()
    assert set(ROOT.iterdir()) == before     # no mine/, run/ or predicted/ in the checkout


def test_cli_epochs_must_be_positive(tmp_path):
    result = run_cli("train", "--profile", "smoke", "--epochs", "0", "--out", str(tmp_path))
    assert result.returncode == 2 and "--epochs" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "last.pt").exists()


def test_relative_paths_follow_the_workspace(tmp_path, monkeypatch):
    """FRCNN_WORKSPACE (which the tests and the notebook runner set) takes the repository root's
    place for relative paths; absolute paths stay as they are."""
    monkeypatch.setenv("FRCNN_WORKSPACE", str(tmp_path))
    assert fc.resolve("runs/smoke") == tmp_path / "runs" / "smoke"
    assert fc.resolve(ROOT / "x") == ROOT / "x"
    monkeypatch.delenv("FRCNN_WORKSPACE")
    assert fc.resolve("runs/smoke") == ROOT / "runs" / "smoke"


def test_the_side_by_sides_torchvision_detector_trains_in_our_loop():
    """bench/train_side_by_side.py trains torchvision's detector with train_one_epoch: its wrapper
    gives our loss names, and the loop's per-step log skips what torchvision's heads do not keep."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import train_side_by_side
    finally:
        sys.path.remove(str(ROOT / "bench"))
    torch.manual_seed(0)
    train_set, _ = fc.make_datasets(SMOKE)
    model = train_side_by_side.torchvision_detector(SMOKE, len(train_set.class_names))   # wrapped: our loss names
    assert isinstance(model, train_side_by_side.RenamedLosses)
    optimizer = fc.make_optimizer(SMOKE, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    history = {k: [] for k in ("step", "lr", "rpn_objectness", "rpn_box", "roi_classifier", "roi_box", "loss")}
    loader = fc.make_data_loader(fc.subset(train_set, 4), batch_size=2, shuffle=False, num_workers=0)
    fc.train_one_epoch(model, loader, optimizer, scheduler, device=torch.device("cpu"), history=history,
                       clip_grad_norm=10.0, progress=False)
    assert history["step"] == [0, 1] and "gt_share" not in history
    assert all(len(history[k]) == 2 for k in history)
