"""The guard: the committed figures and README's results still describe the code.

    python tools/results_guard.py [--images DIR] [--readme FILE]   # exit 1, naming each stale result

A figure means something only for the code that drew it: the loss curves of notebook 05 belong
to the `cpu` profile's settings, the class counts of notebook 01 to the embedded dataset's class
list. So the notebook runner (tools/run_notebooks.py) writes images/manifest.json beside the
figures: for each one, the notebook that drew it, the profile, and a fingerprint of what gives it
its meaning,

    notebook   the notebook's code cells (and any parameter the runner set besides PROFILE)
    profile    every setting of the profile (frcnn_common.PROFILES[profile])
    dataset    the embedded dataset's class list and generator version

each a short hash. This check recomputes the fingerprints from the current code and names each
figure whose meaning has changed since it was drawn, with the command that draws it again.
README's generated results sections (tools/results_table.py) end with a hidden line that records
the profile and dataset fingerprints they were measured with; they are checked the same way.
tests/test_results.py runs the check, so `make test` fails on a stale result.
"""
from __future__ import annotations

import argparse
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
README_SECTIONS = {"results": "make run", "side_by_side": "make side-by-side"}   # name -> what rewrites it
MANIFEST = "manifest.json"
COMMITTED_PROFILE = "cpu"   # the profile of the committed figures and of README's results
WHAT = {"notebook": "the notebook's code", "profile": "the {profile} profile's settings",
        "dataset": "the embedded dataset's classes or generator"}


def _digest(obj) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def profile_fingerprint(profile: str) -> dict[str, str]:
    """The hashes of a profile's settings and of the embedded dataset's definition."""
    return {"profile": _digest(asdict(fc.PROFILES[profile])),
            "dataset": _digest({"classes": list(fc.SHAPES_CLASSES), "generator": fc._SHAPES_VERSION})}


def fingerprint(notebook: pathlib.Path, profile: str, parameters: dict | None = None) -> dict[str, str]:
    """What gives a notebook's figures their meaning, as {component: hash}."""
    nb = nbformat.read(str(notebook), as_version=4)
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    return {"notebook": _digest({"code": code, "parameters": parameters or {}}), **profile_fingerprint(profile)}


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


def fingerprint_line() -> str:
    """The hidden last line of a generated README section: what its numbers were measured with."""
    return (f"<!-- describes: profile {COMMITTED_PROFILE}, fingerprint "
            f"{json.dumps(profile_fingerprint(COMMITTED_PROFILE), sort_keys=True)} -->")


def stale_sections(readme: str) -> list[str]:
    """One line for each generated README section whose recorded fingerprint is not the code's."""
    problems, current = [], profile_fingerprint(COMMITTED_PROFILE)
    for name, command in README_SECTIONS.items():
        match = re.search(f"<!-- begin {name} -->(.*?)<!-- end {name} -->", readme, flags=re.S)
        recorded = match and re.search(r"<!-- describes: profile (\w+), fingerprint (\{.*?\}) -->", match.group(1))
        if not recorded:
            problems.append(f"README.md's '{name}' section records no fingerprint; regenerate: {command}")
            continue
        old = json.loads(recorded.group(2))
        why = [f"measured with PROFILE={recorded.group(1)}"] if recorded.group(1) != COMMITTED_PROFILE else []
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
