"""Every notebook ends with its exercises: an "## Exercises" section of 3 to 5 markdown cells, each a
question that asks for a prediction, the code to paste (a fenced python block, which papermill never
runs), and the answer in a collapsed <details> block. The code is checked to parse; running it is the
learner's part (each exercise was run in the smoke profile when written, and its answer quotes that run)."""
import ast
import re

import nbformat
import pytest

from tools.run_notebooks import NOTEBOOKS

NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
CODE = re.compile(r"```python\n(.*?)\n```", re.S)
ANSWER = re.compile(r"<details><summary>Answer</summary>\n\n(.*?)\n\n</details>", re.S)


def exercise_problems(nb: nbformat.NotebookNode) -> list[str]:
    """What is wrong with a notebook's exercises section (an empty list when nothing is)."""
    starts = [i for i, cell in enumerate(nb.cells) if cell.source.startswith("## Exercises")]
    if len(starts) != 1:
        return [f"{len(starts)} '## Exercises' cells, expected one"]
    section = nb.cells[starts[0]:]
    problems = [f"cell {starts[0] + i} in the exercises is a {cell.cell_type} cell, not markdown"
                for i, cell in enumerate(section) if cell.cell_type != "markdown"]
    summary = [i for i, cell in enumerate(nb.cells) if cell.source.startswith("## Summary")]
    if summary and summary[-1] > starts[0]:
        problems.append("the exercises come before the summary; they end the notebook")
    exercises = [cell.source for cell in section if cell.source.startswith("### Exercise")]
    if not 3 <= len(exercises) <= 5:
        problems.append(f"{len(exercises)} exercises, expected 3 to 5")
    for k, text in enumerate(exercises, 1):
        if not text.startswith(f"### Exercise {k}:"):
            problems.append(f"exercise {k} is numbered {text.splitlines()[0]!r}")
        if "predict first" not in text.lower():
            problems.append(f"exercise {k} does not ask for a prediction ('predict first')")
        code, answer = CODE.findall(text), ANSWER.search(text)
        if len(code) != 1:
            problems.append(f"exercise {k} has {len(code)} python blocks, expected one")
        else:
            try:
                ast.parse(code[0])
            except SyntaxError as err:
                problems.append(f"exercise {k}'s code does not parse: {err}")
        if answer is None or not answer.group(1).strip():
            problems.append(f"exercise {k} has no answer in <details><summary>Answer</summary> ... </details>")
        elif code and text.index(answer.group(0)) < text.index(code[0]):
            problems.append(f"exercise {k}'s answer comes before its code")
        elif "smoke" not in answer.group(1):
            problems.append(f"exercise {k}'s answer does not say which profile its numbers come from")
    return problems


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=[p.stem for p in NOTEBOOK_PATHS])
def test_notebook_ends_with_its_exercises(path):
    problems = exercise_problems(nbformat.read(str(path), as_version=4))
    assert not problems, f"{path.name}: " + "; ".join(problems)


def test_the_check_finds_broken_exercises():
    def notebook(*sources, code_cell=False):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_markdown_cell(s) for s in sources]
        if code_cell:
            nb.cells.append(nbformat.v4.new_code_cell("print('run by papermill')"))
        return nb

    good = ("### Exercise {k}: a threshold\n\nChange it. **Predict first**: what happens?\n\n"
            "```python\nx = {k}\n```\n\n<details><summary>Answer</summary>\n\nIn the `smoke` run: {k}.\n\n</details>")
    exercises = [good.format(k=k) for k in (1, 2, 3)]
    assert exercise_problems(notebook("## Summary", "## Exercises", *exercises)) == []
    assert exercise_problems(notebook("## Exercises", *exercises[:2]))[0] == "2 exercises, expected 3 to 5"
    assert "not markdown" in exercise_problems(notebook("## Exercises", *exercises, code_cell=True))[0]
    assert "before the summary" in exercise_problems(notebook("## Exercises", *exercises, "## Summary"))[0]
    broken = exercises[2].replace("x = 3", "x = (3")
    assert "does not parse" in exercise_problems(notebook("## Exercises", *exercises[:2], broken))[0]
    unanswered = exercises[2].split("<details>")[0]
    assert "no answer" in exercise_problems(notebook("## Exercises", *exercises[:2], unanswered))[0]
    no_prediction = exercises[2].replace("**Predict first**", "Then")
    assert "prediction" in exercise_problems(notebook("## Exercises", *exercises[:2], no_prediction))[0]
