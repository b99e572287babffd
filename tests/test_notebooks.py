"""Every notebook: well formed as committed, and runs top to bottom through the project's runner
(tools/run_notebooks.py) with PROFILE="smoke", writing every figure it declares, none blank.

With --full (or FRCNN_FULL_TESTS=1) the notebooks run with PROFILE="cpu" instead."""
import ast
import os
import pathlib
import re
import time

import matplotlib.image
import nbformat
import numpy as np
import pytest

from tools.run_notebooks import NOTEBOOKS, ROOT, NotebookError, declared_figures, run_notebook

NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOK_PATHS]


def test_there_are_notebooks():
    assert NOTEBOOK_PATHS, f"no notebooks in {NOTEBOOKS}"


def assigned_names(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=IDS)
def test_notebook_is_well_formed(path):
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernel must be python3"

    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters', expected exactly one"
    assert tagged[0].cell_type == "code"
    assert "PROFILE" in assigned_names(tagged[0].source), f"{path.name}: the parameters cell must set PROFILE"

    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {i} has committed outputs"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count"

    figures = declared_figures(path)
    assert figures, f'{path.name}: declares no figures in metadata["frcnn"]["figures"]'
    for figure in figures:
        assert figure.startswith("images/") and figure.endswith(".png"), f"{path.name}: {figure!r}"


def assert_not_blank(png: pathlib.Path):
    pixels = matplotlib.image.imread(str(png))  # (H, W, 3 or 4), floats in 0..1 for PNG
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 50, f"{png}: image is {pixels.shape}"
    rgb = pixels[..., :3]
    assert rgb.std() > 0.02, f"{png}: nearly a single colour (std {rgb.std():.4f})"
    # more than a frame and a title: at least 1% of the pixels differ from the most common colour
    colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    background = colours[counts.argmax()]
    assert (np.abs(rgb - background).max(axis=-1) > 0.05).mean() > 0.01, f"{png}: nearly empty"


def checkout_state() -> dict:
    """Every file under the checkout's data/ and runs/, with its modification time."""
    return {p: p.stat().st_mtime_ns for folder in ("data", "runs") if (ROOT / folder).is_dir()
            for p in (ROOT / folder).rglob("*")}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=IDS)
def test_notebook_runs_and_draws_its_figures(path, tmp_path, full_tests):
    started = time.time()
    failure = None
    before = checkout_state()
    try:
        # figures go to tmp_path/images: a test run must not overwrite the committed figures;
        # data/ and runs/ go to a fresh workspace: the checkout stays as it was, and no notebook
        # reads what an earlier run left behind (notebook 06 run alone trains its own model)
        run_notebook(path, profile="cpu" if full_tests else "smoke", out_dir=tmp_path,
                     images_dir=tmp_path / "images", workspace=tmp_path / "workspace")
    except NotebookError as err:
        failure = str(err)  # reported outside the except block: the message alone, no traceback
    if failure:
        pytest.fail(failure, pytrace=False)
    assert checkout_state() == before, f"{path.name} wrote into the checkout's data/ or runs/"
    written = sorted(p.name for p in (tmp_path / "images").glob("*.png"))
    for figure in declared_figures(path):
        png = tmp_path / figure          # figure is "images/NAME.png"
        assert png.is_file(), f"{path.name} did not write {figure} (it wrote {written})"
        # 1 s of slack for file systems that store whole seconds
        assert png.stat().st_mtime >= started - 1, f"{path.name} did not rewrite {figure} in this run"
        assert_not_blank(png)


def test_runner_names_the_failing_cell(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A notebook that fails"),
        nbformat.v4.new_code_cell('PROFILE = "cpu"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("# the bad cell\nshapes = {}\nshapes['P7']"),
    ]
    path = tmp_path / "99_fails.ipynb"
    nbformat.write(nb, str(path))
    with pytest.raises(NotebookError) as info:
        run_notebook(path, profile="smoke", out_dir=tmp_path / "out")
    message = str(info.value)
    # cell 3 of the notebook as written (papermill's injected cell is not counted)
    assert "99_fails.ipynb failed in cell 3 (`# the bad cell`): KeyError: 'P7'" in message
    assert (tmp_path / "out" / "99_fails.ipynb").is_file()


def test_figures_go_where_the_runner_says(tmp_path):
    """images_dir reaches the notebook (through FRCNN_IMAGES), workspace reaches fc.resolve
    (through FRCNN_WORKSPACE), and the caller's environment is left as it was."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('PROFILE = "cpu"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import os, pathlib\n"
                                          "import frcnn_common as fc\n"
                                          "pathlib.Path(os.environ['FRCNN_IMAGES'], 'marker.txt').write_text(PROFILE)\n"
                                          "fc.resolve('runs/marker.txt').parent.mkdir(parents=True)\n"
                                          "fc.resolve('runs/marker.txt').write_text(PROFILE)")]
    path = tmp_path / "98_images.ipynb"
    nbformat.write(nb, str(path))
    before = {name: os.environ.get(name) for name in ("FRCNN_IMAGES", "FRCNN_WORKSPACE")}
    (tmp_path / "figs").mkdir()
    run_notebook(path, profile="smoke", out_dir=tmp_path / "out", images_dir=tmp_path / "figs",
                 workspace=tmp_path / "work")
    assert (tmp_path / "figs" / "marker.txt").read_text() == "smoke"
    assert (tmp_path / "work" / "runs" / "marker.txt").read_text() == "smoke"
    assert {name: os.environ.get(name) for name in before} == before


def test_readme_shows_every_figure():
    """The README's gallery shows every figure a notebook declares (the docs match the series)."""
    readme = (ROOT / "README.md").read_text()
    missing = [f for path in NOTEBOOK_PATHS for f in declared_figures(path) if f"]({f})" not in readme]
    assert not missing, f"figures not shown in README.md: {missing}"
    # and every picture it links is there (a committed figure, not a broken link)
    linked = re.findall(r"!\[[^\]]*\]\((images/[^)]+)\)", readme)
    assert linked, "README.md shows no figures"
    broken = [f for f in linked if not (ROOT / f).is_file()]
    assert not broken, f"README.md links figures that do not exist: {broken}"


def test_series_order_trains_before_the_notebooks_that_show_the_trained_model(tmp_path):
    """`make run` runs a notebook after those its metadata names in "after"; the rest keep name order."""
    from tools.run_notebooks import runs_after, series_order
    paths = []
    for name, after in (("01_a", []), ("02_b", ["05_e"]), ("03_c", []), ("04_d", ["05_e"]), ("05_e", []),
                        ("06_f", ["99_absent"])):
        nb = nbformat.v4.new_notebook()
        nb.metadata["frcnn"] = {"after": after}
        nbformat.write(nb, str(tmp_path / f"{name}.ipynb"))
        paths.append(tmp_path / f"{name}.ipynb")
    assert [p.stem for p in series_order(paths)] == ["01_a", "03_c", "05_e", "02_b", "04_d", "06_f"]
    # the committed series: 02 and 04 show 05's checkpoint, so they run after it
    order = [p.stem for p in series_order(NOTEBOOK_PATHS)]
    for stem in order:
        for before in runs_after(NOTEBOOKS / f"{stem}.ipynb"):
            assert order.index(before) < order.index(stem)
