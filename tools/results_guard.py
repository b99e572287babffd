"""The guard: the committed figures and README's results still describe the code.

    python tools/results_guard.py [--images DIR] [--readme FILE]   # exit 1, naming each stale result

A figure means something only for the code that drew it: the loss curves of notebook 05 belong
to the `cpu` profile's settings, the class counts of notebook 01 to the embedded dataset's class
list. So the notebook runner (tools/run_notebooks.py) writes images/manifest.json beside the
figures: for each one, the notebook that drew it, the profile, and a fingerprint of what gives it
its meaning,

    notebook   the notebook's code cells (and any parameter the runner set besides PROFILE)
    code       the frcnn_common code the notebook runs: every function, class and constant of the
               module that its code cells name (fc.NAME), and all that those name in turn, as
               ast.unparse writes them without docstrings (so comments and docstrings do not count)
    profile    every setting of the profile (frcnn_common.PROFILES[profile])
    dataset    the embedded dataset's class list and generator version

each a short hash. This check recomputes the fingerprints from the current code and names each
figure whose meaning has changed since it was drawn, with the command that draws it again.
README's generated sections end with a hidden line that records what they were measured with;
they are checked the same way: the results tables (tools/results_table.py) the profile, the
dataset and the code that training and evaluation run (TRAINING), the speed table (`make bench`,
tools/readme_section.py) bench/benchmark.py and the frcnn_common code it times.
tests/test_results.py runs the check, so `make test` fails on a stale result.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import pathlib
import re
import sys
from dataclasses import asdict

import nbformat

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import frcnn_common as fc  # noqa: E402  (the code whose state the fingerprints describe)

NOTEBOOKS = ROOT / "notebooks"
IMAGES = ROOT / "images"
README = ROOT / "README.md"
README_SECTIONS = {"results": "make run", "side_by_side": "make side-by-side",   # name -> what rewrites it
                   "bench": "make bench", "deploy_bench": "make bench"}
SPEED_SECTIONS = ("bench", "deploy_bench")      # both written by bench/benchmark.py
BENCHMARK = ROOT / "bench" / "benchmark.py"    # what writes the "bench" section
MANIFEST = "manifest.json"
COMMITTED_PROFILE = "cpu"   # the profile of the committed figures and of README's results
TRAINING = ("train_in_processes", "evaluate_model", "load_checkpoint")   # what README's results ran
WHAT = {"notebook": "the notebook's code", "code": "the frcnn_common code it runs",
        "profile": "the {profile} profile's settings", "dataset": "the embedded dataset's classes or generator",
        "bench": "bench/benchmark.py or the frcnn_common code it times"}


def _digest(obj) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def profile_fingerprint(profile: str) -> dict[str, str]:
    """The hashes of a profile's settings and of the embedded dataset's definition."""
    return {"profile": _digest(asdict(fc.PROFILES[profile])),
            "dataset": _digest({"classes": list(fc.SHAPES_CLASSES), "generator": fc._SHAPES_VERSION})}


def _without_docstrings(node: ast.AST) -> ast.AST:
    """The node with the docstring of every module, class and function in it removed (in place)."""
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if (isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            n.body = body[1:] or [ast.Pass()]
    return node


def _definitions() -> dict[str, ast.AST]:
    """frcnn_common's top-level functions, classes and assigned names, each with its statement."""
    tree = ast.parse((ROOT / "frcnn_common.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        found[name.id] = node
    return found


def code_fingerprint(roots) -> str:
    """The hash of the frcnn_common code that `roots` (names in the module) run: their source and
    that of every module-level name they use, transitively; docstrings and comments do not count.
    The profiles and the class list are left out: the profile and dataset components say those."""
    definitions = {name: node for name, node in _definitions().items()
                   if name not in ("PROFILES", "SHAPES_CLASSES", "_SHAPES_VERSION")}
    used, todo = set(), [name for name in roots if name in definitions]
    while todo:
        name = todo.pop()
        if name not in used:
            used.add(name)
            todo += [n.id for n in ast.walk(definitions[name]) if isinstance(n, ast.Name) and n.id in definitions]
    return _digest({name: ast.unparse(_without_docstrings(definitions[name])) for name in sorted(used)})


def _module_names(source: str) -> set[str]:
    """The frcnn_common names that code refers to as fc.NAME."""
    return set(re.findall(r"\bfc\.([A-Za-z_]\w*)", source))


def fingerprint(notebook: pathlib.Path, profile: str, parameters: dict | None = None) -> dict[str, str]:
    """What gives a notebook's figures their meaning, as {component: hash}."""
    nb = nbformat.read(str(notebook), as_version=4)
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    return {"notebook": _digest({"code": code, "parameters": parameters or {}}),
            "code": code_fingerprint(sorted(_module_names("\n".join(code)))), **profile_fingerprint(profile)}


def section_fingerprint(name: str) -> dict[str, str]:
    """What a generated README section's numbers depend on, as {component: hash}."""
    if name in SPEED_SECTIONS:
        source = BENCHMARK.read_text()
        script = ast.unparse(_without_docstrings(ast.parse(source)))
        return {"bench": _digest({"script": script, "code": code_fingerprint(sorted(_module_names(source)))})}
    return {**profile_fingerprint(COMMITTED_PROFILE), "code": code_fingerprint(TRAINING)}


def _command(notebook: str, profile: str) -> str:
    return f"make run (or .venv/bin/python tools/run_notebooks.py --profile {profile} {pathlib.Path(notebook).stem})"


def record(images_dir: pathlib.Path, notebook: pathlib.Path, figures: list[str], profile: str,
           parameters: dict | None = None) -> pathlib.Path:
    """Enter `figures` (paths like "images/x.png"), just drawn by `notebook`, into the manifest of
    images_dir, keeping the entries of other figures; written atomically."""
    path = images_dir / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    notebook = notebook.resolve()
    name = notebook.relative_to(ROOT).as_posix() if notebook.is_relative_to(ROOT) else str(notebook)
    entry = {"notebook": name, "profile": profile, "parameters": parameters or {},
             "fingerprint": fingerprint(notebook, profile, parameters),
             "drawn": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    manifest.update({figure: entry for figure in figures})
    fc._write_json_atomic(path, dict(sorted(manifest.items())), indent=1)
    return path


def stale_figures(images_dir: pathlib.Path = IMAGES, notebooks_dir: pathlib.Path = NOTEBOOKS) -> list[str]:
    """One line for each figure that no longer describes the code: what changed, and the command
    that redraws it. Empty when every declared figure is current."""
    path = images_dir / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    problems, declared = [], set()
    for notebook in sorted(notebooks_dir.glob("*.ipynb")):
        nb = nbformat.read(str(notebook), as_version=4)
        figures = list(nb.metadata.get("frcnn", {}).get("figures", []))
        declared |= set(figures)
        current = fingerprint(notebook, COMMITTED_PROFILE)
        name = f"notebooks/{notebook.name}"
        for figure in figures:
            entry = manifest.get(figure)
            if entry is None:
                problems.append(f"{figure}: not in {path.name}, so nothing says what drew it; "
                                f"regenerate: {_command(name, COMMITTED_PROFILE)}")
                continue
            why = []
            if entry["notebook"] != name:
                why.append(f"drawn by {entry['notebook']}, now declared by {name}")
            if entry["profile"] != COMMITTED_PROFILE:
                why.append(f"drawn with PROFILE={entry['profile']}, not {COMMITTED_PROFILE}")
            elif entry.get("parameters"):
                why.append(f"drawn with parameters {entry['parameters']} besides PROFILE")
            else:
                why += [WHAT[k].format(profile=COMMITTED_PROFILE) + " changed"
                        for k, value in current.items() if entry["fingerprint"].get(k) != value]
            if why:
                problems.append(f"{figure} ({name}, drawn {entry.get('drawn', '?')}): {'; '.join(why)}; "
                                f"regenerate: {_command(name, COMMITTED_PROFILE)}")
    for figure in sorted(set(manifest) - declared):
        problems.append(f"{figure}: no notebook declares it any more; delete it and its manifest entry")
    return problems


def fingerprint_line(name: str = "results") -> str:
    """The hidden last line of a generated README section: what its numbers were measured with."""
    describes = "bench" if name in SPEED_SECTIONS else f"profile {COMMITTED_PROFILE}"
    return f"<!-- describes: {describes}, fingerprint {json.dumps(section_fingerprint(name), sort_keys=True)} -->"


def stale_sections(readme: str) -> list[str]:
    """One line for each generated README section whose recorded fingerprint is not the code's."""
    problems = []
    for name, command in README_SECTIONS.items():
        current = section_fingerprint(name)
        match = re.search(f"<!-- begin {name} -->(.*?)<!-- end {name} -->", readme, flags=re.S)
        recorded = match and re.search(r"<!-- describes: (?:profile )?(\w+), fingerprint (\{.*?\}) -->",
                                       match.group(1))
        if not recorded:
            problems.append(f"README.md's '{name}' section records no fingerprint; regenerate: {command}")
            continue
        old = json.loads(recorded.group(2))
        expected = "bench" if name in SPEED_SECTIONS else COMMITTED_PROFILE
        why = [f"measured with PROFILE={recorded.group(1)}"] if recorded.group(1) != expected else []
        why += [WHAT[k].format(profile=COMMITTED_PROFILE) + " changed" for k in current if old.get(k) != current[k]]
        if why:
            problems.append(f"README.md's '{name}' section: {'; '.join(why)} since it was measured; "
                            f"regenerate: {command}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=pathlib.Path, default=IMAGES, help="the figures' folder (default: images/)")
    parser.add_argument("--readme", type=pathlib.Path, default=README, help="default: README.md")
    args = parser.parse_args(argv)
    problems = stale_figures(args.images) + stale_sections(args.readme.read_text())
    for line in problems:
        print(f"stale: {line}")
    if problems:
        print(f"{len(problems)} result(s) no longer describe the code", file=sys.stderr)
        return 1
    print(f"every figure in {args.images} and every result in {args.readme.name} describes the current code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
