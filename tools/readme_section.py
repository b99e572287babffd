"""Put a generated Markdown file into README.md between `<!-- begin NAME -->` and `<!-- end NAME -->`.

    python tools/readme_section.py bench bench/results.md

`make bench` uses it so the README's speed table is always the last measured one.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def replace_section(readme: str, name: str, body: str) -> str:
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), flags=re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no '{begin}' ... '{end}' section")
    return pattern.sub(lambda _: f"{begin}\n{body.strip()}\n{end}", readme)


if __name__ == "__main__":
    name, source = sys.argv[1], pathlib.Path(sys.argv[2])
    readme = ROOT / "README.md"
    body = source.read_text()
    sys.path.insert(0, str(ROOT))
    from tools.results_guard import README_SECTIONS, fingerprint_line
    if name in README_SECTIONS and "<!-- describes:" not in body:   # what the guard checks it against
        body = body.rstrip() + "\n\n" + fingerprint_line(name)
    readme.write_text(replace_section(readme.read_text(), name, body))
    print(f"README.md: section '{name}' now holds {source}")
