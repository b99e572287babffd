"""Run the notebooks headless with papermill: the one runner behind `make run` and the tests.

    python tools/run_notebooks.py [--profile smoke|cpu|full] [--out DIR] [--images DIR] [--workspace DIR]
                                  [NOTEBOOK_OR_GLOB ...]

With no notebook named, every notebooks/*.ipynb runs, in name order (the series is numbered, and
a later notebook may read what an earlier one wrote, as 06 reads 05's checkpoint), except that a
notebook whose metadata says it shows another's results runs after it (02 and 04 draw the
trained model of 05: nb.metadata["frcnn"]["after"] = ["05_training"]). Each notebook
runs with the repository root as its working directory, on the `python3` kernel, with the
papermill parameter PROFILE set; the executed copy (with its outputs) goes to DIR
(build/notebooks/ by default, which git ignores), so the committed notebooks stay output-free.
The figures a notebook draws land in images/ under the repository root, as in a manual run,
or in the folder that --images (images_dir) names: the notebooks read it from the environment
variable FRCNN_IMAGES. The tests send their smoke figures there, so a test run never overwrites
the committed figures of a `make run`. Likewise --workspace (workspace) sends the datasets and
runs (data/..., runs/...) to another folder through FRCNN_WORKSPACE, which fc.resolve honours:
a notebook builds every such path with fc.resolve("data/...") or fc.resolve("runs/..."), never
ROOT / "data" (the tests run each notebook in a fresh workspace, so that nothing lands in the
checkout and no notebook reads what an earlier test run left behind).

The first failing notebook stops the run: the runner names the notebook, the failing cell
(its index in the notebook as committed, and the first line of its source) and the exception,
and exits with status 1; the executed copy holds the full traceback.

Figures convention: every notebook declares the figures it writes, as paths relative to the
repository root, in its notebook metadata,

    nb.metadata["frcnn"]["figures"] = ["images/fpn_features.png", "images/activation_histograms.png"]

so that tests/test_notebooks.py can check, after a run, that each one was written and is not blank.
After a notebook runs, the runner enters the figures it wrote in images/manifest.json (in the
figures' folder): the notebook, the profile, and a fingerprint of what gives each figure its
meaning, which tools/results_guard.py checks against the current code.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import nbformat

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
DEFAULT_OUT = ROOT / "build" / "notebooks"
PROFILES = ("smoke", "cpu", "full")
if str(ROOT) not in sys.path:      # `python tools/run_notebooks.py` puts tools/ there, not the root
    sys.path.insert(0, str(ROOT))


class NotebookError(RuntimeError):
    """A notebook failed; the message names the notebook, the cell and the exception."""


def declared_figures(path: str | pathlib.Path) -> list[str]:
    """The figures a notebook declares in nb.metadata["frcnn"]["figures"] (repo-relative paths)."""
    nb = nbformat.read(str(path), as_version=4)
    return list(nb.metadata.get("frcnn", {}).get("figures", []))


def _first_line(source: str) -> str:
    lines = [line for line in source.splitlines() if line.strip()]
    return lines[0].strip() if lines else "<empty cell>"


def _source_cell_index(nb: nbformat.NotebookNode, executed_index: int) -> int | None:
    """Map a cell index of the executed notebook back to the committed one.

    papermill inserts one cell, tagged `injected-parameters`, right after the `parameters` cell
    (at the top when there is none); cells after it are shifted by one. None: the injected cell.
    """
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    injected_at = tagged[0] + 1 if tagged else 0
    if executed_index == injected_at:
        return None
    return executed_index - 1 if executed_index > injected_at else executed_index


def run_notebook(path: str | pathlib.Path, *, profile: str, out_dir: str | pathlib.Path = DEFAULT_OUT,
                 parameters: dict | None = None, images_dir: str | pathlib.Path | None = None,
                 workspace: str | pathlib.Path | None = None) -> float:
    """Execute one notebook with PROFILE=`profile` (plus any other `parameters`) from the
    repository root; write the executed copy to `out_dir`; return the wall time in seconds.
    images_dir: where the notebook's figures go (default: the repository's images/);
    workspace: where its data/ and runs/ go (default: the repository's, or FRCNN_WORKSPACE's).

    Raises NotebookError, with a one-paragraph message, when a cell fails or the kernel dies.
    """
    import papermill  # imported here so that `--help` and the notebook checks stay light

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    path = pathlib.Path(path).resolve()
    if not path.is_file():
        raise NotebookError(f"{path}: no such notebook")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / path.name
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path

    # The kernel inherits this process's environment: that is how the notebook learns images_dir
    # and workspace.
    settings = {"FRCNN_IMAGES": images_dir, "FRCNN_WORKSPACE": workspace}
    saved_env = {variable: os.environ.get(variable) for variable in settings}
    for variable, folder in settings.items():
        if folder is not None:
            os.environ[variable] = str(pathlib.Path(folder).resolve())
    start, started_at = time.perf_counter(), time.time()
    try:
        papermill.execute_notebook(
            str(path), str(out_path),
            parameters={"PROFILE": profile, **(parameters or {})},
            kernel_name="python3", cwd=str(ROOT), progress_bar=False,
            # the kernel's own log (transport warnings, the interrupt at shutdown) is noise here;
            # errors in cells still come back through the notebook
            extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
        )
    except papermill.PapermillExecutionError as err:
        index = _source_cell_index(nbformat.read(str(path), as_version=4), err.cell_index)
        where = "the injected parameters cell" if index is None else f"cell {index}"
        evalue = err.evalue.strip().splitlines()[0] if err.evalue.strip() else ""
        raise NotebookError(
            f"{name} failed in {where} (`{_first_line(err.source)}`): {err.ename}: {evalue}\n"
            f"  full traceback in the executed copy {out_path}"
        ) from None
    except Exception as err:  # a dead kernel, a timeout, an unreadable notebook
        raise NotebookError(f"{name} did not run: {type(err).__name__}: {err}") from None
    finally:
        for variable, value in saved_env.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
    seconds = time.perf_counter() - start
    # What the figures just drawn describe: images/manifest.json (tools/results_guard.py).
    from tools.results_guard import record
    images = pathlib.Path(images_dir) if images_dir is not None else ROOT / "images"
    drawn = [f for f in declared_figures(path)
             if (images / pathlib.Path(f).name).is_file()
             and (images / pathlib.Path(f).name).stat().st_mtime >= started_at - 1]
    if drawn:
        record(images, path, drawn, profile, parameters)
    return seconds


def runs_after(path: str | pathlib.Path) -> list[str]:
    """The notebooks (stems) whose results this one shows when they exist, from
    nb.metadata["frcnn"]["after"]: 02 and 04 show the trained model that 05 writes."""
    nb = nbformat.read(str(path), as_version=4)
    return list(nb.metadata.get("frcnn", {}).get("after", []))


def series_order(paths: list[pathlib.Path]) -> list[pathlib.Path]:
    """Name order, except that a notebook runs after the notebooks its metadata names in
    "after" (when they run too): the reading order stays 01, 02, ..., but `make run` trains in
    05 before 02 and 04 draw the trained backbone and RPN."""
    pending, done, order = list(paths), set(), []
    stems = {p.stem for p in paths}
    while pending:
        ready = next(p for p in pending if all(a in done or a not in stems for a in runs_after(p))
                     or p is pending[-1])   # a cycle cannot stall the run: the last goes anyway
        pending.remove(ready)
        order.append(ready)
        done.add(ready.stem)
    return order


def find_notebooks(patterns: list[str]) -> list[pathlib.Path]:
    """Notebook paths from names or globs (relative to the working directory, the repository
    root or notebooks/); all of notebooks/*.ipynb, in series order (series_order), when none
    is given."""
    if not patterns:
        return series_order(sorted(NOTEBOOKS.glob("*.ipynb")))
    found = []
    for pattern in patterns:
        matches = []
        for base in (pathlib.Path.cwd(), ROOT, NOTEBOOKS):
            matches = sorted(p for p in base.glob(pattern) if p.suffix == ".ipynb")
            if not matches and not pattern.endswith(".ipynb"):
                matches = sorted(base.glob(pattern + ".ipynb"))
            if matches:
                break
        if not matches:
            raise SystemExit(f"run_notebooks: no notebook matches {pattern!r}")
        found += [p.resolve() for p in matches if p.resolve() not in found]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="cpu",
                        help="smoke: seconds (tests); cpu: minutes on a laptop (default); full: GPU")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="where the executed copies go (default: build/notebooks/)")
    parser.add_argument("--images", default=None,
                        help="where the figures go (default: images/ under the repository root)")
    parser.add_argument("--workspace", default=None,
                        help="where data/ and runs/ go (default: the repository root's)")
    parser.add_argument("notebooks", nargs="*", help="notebook names or globs (default: all, in order)")
    args = parser.parse_args(argv)

    notebooks = find_notebooks(args.notebooks)
    if not notebooks:
        print(f"run_notebooks: no notebooks in {NOTEBOOKS}", file=sys.stderr)
        return 1
    total, timings = 0.0, {}
    # Timings for the record need a quiet machine: the load when the run starts goes with them.
    load_at_start = round(os.getloadavg()[0], 2)
    print(f"load average at the start: {load_at_start} (a run for the record wants it under 0.5)")
    for path in notebooks:
        print(f"{path.name:<28} PROFILE={args.profile} ...", end=" ", flush=True)
        try:
            seconds = run_notebook(path, profile=args.profile, out_dir=args.out, images_dir=args.images,
                                   workspace=args.workspace)
        except NotebookError as err:
            print("FAILED")
            print(f"run_notebooks: {err}", file=sys.stderr)
            return 1
        total += seconds
        timings[path.name] = round(seconds, 1)
        print(f"{seconds:7.1f} s")
    print(f"{len(notebooks)} notebook(s) in {total:.1f} s; executed copies in {args.out}")
    # what `make results` quotes as the series' wall time (tools/results_table.py)
    # complete: the whole series ran, so total_seconds is the wall time of `make run`
    (pathlib.Path(args.out) / "timings.json").write_text(json.dumps(
        {"profile": args.profile, "notebooks": timings, "total_seconds": round(total, 1),
         "complete": not args.notebooks, "load_at_start": load_at_start}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
