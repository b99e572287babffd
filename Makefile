# Faster R-CNN from scratch. On a fresh machine: `make run` (all notebooks, regenerates images/)
# and `make test` (what CI runs). Everything goes through the virtualenv in .venv/.

PYTHON  := .venv/bin/python
PROFILE ?= cpu
STAMP   := .venv/.installed

.PHONY: venv run test lab bench clean

venv: $(STAMP)

# Reinstalls only when requirements.txt is newer than the stamp.
$(STAMP): requirements.txt
	python3 -m venv .venv
	$(PYTHON) -m pip install -r requirements.txt
	touch $(STAMP)

# Runs every notebook headless, in order, from the repository root; rewrites images/.
# `make run PROFILE=smoke` for a quick pass, `make run PROFILE=full` on a GPU.
run: venv
	$(PYTHON) tools/run_notebooks.py --profile $(PROFILE)

test: venv
	$(PYTHON) -m pytest tests

lab: venv
	$(PYTHON) -m jupyter lab notebooks

bench: venv
	$(PYTHON) bench/benchmark.py
	$(PYTHON) tools/readme_section.py bench bench/results.md

# Build outputs and caches only: images/ (committed), data/ (the dataset), runs/ (checkpoints)
# and .venv/ stay.
clean:
	rm -rf build .pytest_cache
	find . -path ./.venv -prune -o -type d -name __pycache__ -print | xargs rm -rf
	find . -path ./.venv -prune -o -type d -name .ipynb_checkpoints -print | xargs rm -rf
