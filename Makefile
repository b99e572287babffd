# Faster R-CNN from scratch. On a fresh machine: `make run` (all notebooks, regenerates images/)
# and `make test` (what CI runs). Everything goes through the virtualenv in .venv/.

PYTHON  := .venv/bin/python
PROFILE ?= cpu
STAMP   := .venv/.installed

.PHONY: venv run results side-by-side test lab bench clean

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
	@if [ "$(PROFILE)" = cpu ]; then $(MAKE) --no-print-directory results; fi

# README's results section, from the last cpu run's runs/cpu/metrics.json (`make run` calls it).
results: venv
	$(PYTHON) tools/results_table.py results

# Ours against torchvision's detection heads, trained the same way (two cpu-profile trainings,
# an hour or less on 2 cores; `make side-by-side EPOCHS=3` trains both 3 epochs instead);
# rewrites bench/side_by_side.json and README's table of it.
side-by-side: venv
	$(PYTHON) bench/train_side_by_side.py --profile cpu $(if $(EPOCHS),--epochs $(EPOCHS))
	$(PYTHON) tools/results_table.py side-by-side

test: venv
	$(PYTHON) -m pytest tests

lab: venv
	$(PYTHON) -m jupyter lab notebooks

bench: venv
	$(PYTHON) bench/benchmark.py
	$(PYTHON) tools/readme_section.py bench bench/results.md
	$(PYTHON) tools/readme_section.py deploy_bench bench/deploy_results.md

# Build outputs and caches only: images/ (committed), data/ (the dataset), runs/ (checkpoints)
# and .venv/ stay.
clean:
	rm -rf build .pytest_cache
	find . -path ./.venv -prune -o -type d -name __pycache__ -print | xargs rm -rf
	find . -path ./.venv -prune -o -type d -name .ipynb_checkpoints -print | xargs rm -rf
