"""Results that describe the code: the figures' manifest, README's generated results sections,
and the guard that fails when either no longer matches the code (tools/results_guard.py)."""
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict

import nbformat
import pytest

import frcnn_common as fc
from tools import results_guard, results_table
from tools.run_notebooks import ROOT, run_notebook


def test_committed_figures_describe_the_code():
    problems = results_guard.stale_figures()
    assert not problems, "stale figures:\n" + "\n".join(problems)


def test_readme_results_describe_the_code():
    problems = results_guard.stale_sections((ROOT / "README.md").read_text())
    assert not problems, "\n".join(problems)


def copy_of_the_project(tmp_path):
    """What the guard reads, copied: the module, the tools, the notebooks, the manifest, README."""
    root = tmp_path / "project"
    (root / "images").mkdir(parents=True)
    shutil.copy(ROOT / "frcnn_common.py", root)
    shutil.copy(ROOT / "README.md", root)
    shutil.copy(ROOT / "images" / "manifest.json", root / "images")
    shutil.copytree(ROOT / "tools", root / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "notebooks", root / "notebooks")
    (root / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "benchmark.py", root / "bench")
    return root


def run_guard(root):
    done = subprocess.run([sys.executable, "tools/results_guard.py"], cwd=root, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


def edit(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {path.name} exactly once"
    path.write_text(text.replace(old, new))


def test_guard_fails_when_the_code_changes(tmp_path):
    """In a copy of the project: the guard passes as committed, and fails, naming each stale figure,
    what changed and the command that redraws it, after a profile setting, the class list or a
    notebook's code changes."""
    root = copy_of_the_project(tmp_path)
    module, original = root / "frcnn_common.py", (root / "frcnn_common.py").read_text()
    code, out = run_guard(root)
    assert code == 0, out

    cpu = fc.PROFILES["cpu"]
    edit(module, f"epochs={cpu.epochs}, batch_size={cpu.batch_size}, cpu_processes=",
         f"epochs={cpu.epochs + 1}, batch_size={cpu.batch_size}, cpu_processes=")
    code, out = run_guard(root)
    assert code == 1
    assert ("stale: images/loss_curves.png (notebooks/05_training.ipynb, drawn " in out
            and "): the cpu profile's settings changed; regenerate: make run (or .venv/bin/python "
                "tools/run_notebooks.py --profile cpu 05_training)" in out), out
    figures = [f for f in json.loads((root / "images" / "manifest.json").read_text())]
    assert all(f"stale: {f} (" in out for f in figures), "every figure depends on the profile"
    assert "README.md's 'results' section: the cpu profile's settings changed since it was measured; " \
           "regenerate: make run" in out

    module.write_text(original)
    edit(module, '"star", "ellipse", "cross")', '"star", "ellipse", "plus")')
    code, out = run_guard(root)
    assert code == 1 and "the embedded dataset's classes or generator changed" in out, out
    assert "the cpu profile's settings changed" not in out

    module.write_text(original)
    notebook = root / "notebooks" / "02_backbone.ipynb"
    nb = nbformat.read(str(notebook), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("print('one more cell')"))
    nbformat.write(nb, str(notebook))
    code, out = run_guard(root)
    stale = re.findall(r"stale: (\S+) \(notebooks/02_backbone.ipynb, drawn [^)]*\): the notebook's code changed;", out)
    assert code == 1 and sorted(stale) == sorted(nb.metadata["frcnn"]["figures"]), out
    assert out.count("stale: ") == len(stale), "only the changed notebook's figures"


def test_guard_sees_the_code_that_results_run(tmp_path):
    """A change to a loss, to NMS or to what the benchmark times marks the results stale; a
    change to docstrings and comments does not."""
    root = copy_of_the_project(tmp_path)
    module, original = root / "frcnn_common.py", (root / "frcnn_common.py").read_text()
    edit(module, "classifier_loss = F.cross_entropy(class_logits, labels)",
         "classifier_loss = F.cross_entropy(class_logits, labels, label_smoothing=0.1)")
    code, out = run_guard(root)
    assert code == 1, out
    assert "stale: images/loss_curves.png (notebooks/05_training.ipynb, drawn " in out
    assert "): the frcnn_common code it runs changed; regenerate: make run" in out
    assert "README.md's 'results' section: the frcnn_common code it runs changed since it was measured" in out
    assert "README.md's 'bench' section: bench/benchmark.py or the frcnn_common code it times changed" in out
    assert "README.md's 'deploy_bench' section: bench/benchmark.py or the frcnn_common code it times changed" in out

    module.write_text(original.replace("boxes = boxes[order]                                                      # (B, 4) by score",
                                       "boxes = boxes[order]  # (B, 4), the highest score first")
                      .replace('"""Greedy non-maximum suppression: visit', '"""Greedy NMS: visit'))
    assert module.read_text().count("Greedy NMS: visit") == 1 and "the highest score first" in module.read_text()
    code, out = run_guard(root)
    assert code == 0, out                                  # docstrings and comments do not count

    module.write_text(original + "\nNOTHING_USES_THIS = 1\n")
    code, out = run_guard(root)
    assert code == 0, out                                  # nor code that no result runs

    module.write_text(original)
    edit(module, "threshold = _float32_above(iou_threshold)", "threshold = _float32_above(0.9 * iou_threshold)")
    code, out = run_guard(root)
    assert code == 1 and "stale: images/detections_gallery.png (notebooks/06_inference.ipynb" in out, out
    assert "README.md's 'results' section: the frcnn_common code it runs changed" in out

    module.write_text(original)
    bench = root / "bench" / "benchmark.py"
    bench.write_text(bench.read_text() + "\nEXTRA_RUNS = 3\n")
    code, out = run_guard(root)
    assert code == 1 and out.count("stale: ") == 2, out     # both speed tables that the script writes
    assert "'bench' section" in out and "'deploy_bench' section" in out, out


def test_guard_names_missing_and_foreign_figures(tmp_path):
    root = copy_of_the_project(tmp_path)
    manifest = json.loads((root / "images" / "manifest.json").read_text())
    drawn = manifest.pop("images/flip.png")
    manifest["images/hexagons.png"] = drawn
    manifest["images/data_samples.png"] = {**drawn, "profile": "smoke"}
    (root / "images" / "manifest.json").write_text(json.dumps(manifest))
    problems = results_guard.stale_figures(root / "images", root / "notebooks")
    assert any(p.startswith("images/flip.png: not in manifest.json") for p in problems), problems
    assert any(p.startswith("images/hexagons.png: no notebook declares it") for p in problems), problems
    assert any(p.startswith("images/data_samples.png (notebooks/01_data.ipynb") and
               "drawn with PROFILE=smoke, not cpu" in p for p in problems), problems
    assert len(problems) == 3, problems


def test_runner_records_what_each_figure_describes(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["frcnn"] = {"figures": ["images/one.png", "images/never_drawn.png"]}
    nb.cells = [nbformat.v4.new_code_cell('PROFILE = "cpu"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import os, pathlib\n"
                                          "pathlib.Path(os.environ['FRCNN_IMAGES'], 'one.png').write_bytes(b'png')")]
    path = tmp_path / "97_draws.ipynb"
    nbformat.write(nb, str(path))
    (tmp_path / "figs").mkdir()
    run_notebook(path, profile="smoke", out_dir=tmp_path / "out", images_dir=tmp_path / "figs")
    manifest = json.loads((tmp_path / "figs" / "manifest.json").read_text())
    assert list(manifest) == ["images/one.png"]               # only what the run drew
    entry = manifest["images/one.png"]
    assert entry["profile"] == "smoke" and entry["notebook"] == str(path.resolve())
    assert entry["fingerprint"] == results_guard.fingerprint(path, "smoke")


def fake_metrics(**changes):
    cfg = json.loads(json.dumps(asdict(fc.PROFILES["cpu"]))) | changes
    epochs = [{"epoch": e, **{k: 0.1 * e + i / 100 for i, k in enumerate(fc.COCO_METRIC_KEYS)},
               "train_seconds": 50.0 * e} for e in (1, 2)]
    return {"config": cfg, "class_names": list(fc.SHAPES_CLASSES), "epochs": epochs,
            "train_seconds": 100.0, "processes": 2, "total_steps": 500}


def test_results_section_is_written_from_metrics_json(tmp_path):
    """`make results`: metrics.json -> README's results section, one row per epoch, with the
    fingerprint line; the rest of README untouched."""
    (tmp_path / "metrics.json").write_text(json.dumps(fake_metrics()))
    (tmp_path / "timings.json").write_text(json.dumps({"profile": "cpu", "total_seconds": 360.0, "complete": True,
                                                       "load_at_start": 2.31}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- begin results -->\nold\n<!-- end results -->\nafter\n")
    results_table.main(["results", str(tmp_path / "metrics.json"), "--timings", str(tmp_path / "timings.json"),
                        "--readme", str(readme)])
    text = readme.read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert rows == ["| 1 | 0.100 | 0.110 | 0.120 | 0.130 | 0.140 | 0.150 | 0.180 | 50 |",
                    "| 2 | 0.200 | 0.210 | 0.220 | 0.230 | 0.240 | 0.250 | 0.280 | 100 |"]
    assert "100 s of training" in text and "6.0 minutes" in text and "2 processes x 2 images" in text
    assert "Load average when `make run` started: 2.31 (not a quiet machine" in text   # the load goes with the times
    assert text.startswith("intro\n<!-- begin results -->\nMeasured on ") and text.endswith("<!-- end results -->\nafter\n")
    assert "old" not in text
    assert results_guard.fingerprint_line() in text


def test_results_refuse_a_run_of_other_settings(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(fake_metrics(epochs=7)))
    with pytest.raises(SystemExit, match=r"not trained with the cpu profile as it is now: epochs 7 \(now 10\)"):
        results_table.main(["results", str(tmp_path / "metrics.json"), "--readme", str(tmp_path / "README.md")])


def test_stale_readme_section_is_named():
    line = results_guard.fingerprint_line()
    current = "<!-- begin results -->\nx\n" + line + "\n<!-- end results -->\n"
    side = "<!-- begin side_by_side -->\ny\n" + line + "\n<!-- end side_by_side -->\n"
    bench = "<!-- begin bench -->\nz\n" + results_guard.fingerprint_line("bench") + "\n<!-- end bench -->\n"
    bench += "<!-- begin deploy_bench -->\nw\n" + results_guard.fingerprint_line("deploy_bench") + "\n<!-- end deploy_bench -->\n"
    assert results_guard.stale_sections(current + side + bench) == []
    recorded = results_guard.section_fingerprint("results")
    old = line.replace(json.dumps(recorded, sort_keys=True), json.dumps({**recorded, "profile": "0"}, sort_keys=True))
    assert results_guard.stale_sections(current.replace(line, old) + side + bench) == [
        "README.md's 'results' section: the cpu profile's settings changed since it was measured; regenerate: make run"]
    assert results_guard.stale_sections(current + bench) == [
        "README.md's 'side_by_side' section records no fingerprint; regenerate: make side-by-side"]
    assert results_guard.stale_sections(current + side) == [
        "README.md's 'bench' section records no fingerprint; regenerate: make bench",
        "README.md's 'deploy_bench' section records no fingerprint; regenerate: make bench"]


def test_side_by_side_section_is_written_from_its_json(tmp_path):
    base = json.loads(json.dumps(asdict(fc.PROFILES["cpu"])))
    ours = {k: 0.5 for k in fc.COCO_METRIC_KEYS} | {"train_seconds": 900.0}
    theirs = {k: 0.25 for k in fc.COCO_METRIC_KEYS} | {"train_seconds": 1000.0}
    result = {"ours": ours, "torchvision": theirs, "epochs": 3, "profile": "cpu", "date": "2026-12-07",
              "machine": "a test machine", "command": "python bench/train_side_by_side.py --profile cpu --epochs 3",
              "config": base | {"epochs": 3}, "profile_config": base}
    (tmp_path / "sbs.json").write_text(json.dumps(result))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- begin side_by_side -->\n<!-- end side_by_side -->\n")
    results_table.main(["side-by-side", str(tmp_path / "sbs.json"), "--readme", str(readme)])
    text = readme.read_text()
    assert "| ours (frcnn_common) | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 900 |" in text
    assert "| torchvision's RPN and RoI heads | 0.250 |" in text and "(2 processes x 2 images a step), 3 epochs (the profile trains 10;" in text
    assert "Command: `python bench/train_side_by_side.py --profile cpu --epochs 3`." in text
    bench = "<!-- begin bench -->\n" + results_guard.fingerprint_line("bench") + "\n<!-- end bench -->\n"
    bench += "<!-- begin deploy_bench -->\n" + results_guard.fingerprint_line("deploy_bench") + "\n<!-- end deploy_bench -->\n"
    assert results_guard.stale_sections(text.replace("side_by_side", "results") + text + bench) == []
