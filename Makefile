# zsadlib: `make demo` runs the main job on the embedded synthetic data, `make test` runs the suite.
# Both create .venv with the pinned dependencies when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.zsadlib-installed
# tests never touch the network; the demo may download the paper's weights when the hub is reachable
# a notebook cell that runs past ZSAD_CELL_TIMEOUT seconds fails its test (a hung kernel must not stall the suite)
TEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0 ZSAD_CELL_TIMEOUT=900

.PHONY: venv test test-fast demo bench data notebooks-clean clean lab mutants regress git-filter report

venv: $(STAMP) git-filter

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet "pip>=24"
	$(BIN)/python -m pip install --quiet -e '.[notebooks,test]'
	$(BIN)/python -m pip install --quiet -e '.[distributed]'  # Ray, for the sweep engine's tests
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 --display-name "zsadlib (.venv)" > /dev/null
	touch $(STAMP)

# nbstripout as git's clean filter for *.ipynb (.gitattributes, tracked): a notebook saved with outputs stays clean
# in git. The filter lives in .git/config, which a clone does not copy, so every `make venv` (re)installs it
# (idempotent; outside a git work tree it does nothing). The extra keys: what a kernel or papermill adds on a run.
NBSTRIPOUT_KEYS := metadata.language_info.version metadata.papermill cell.metadata.papermill
git-filter: $(STAMP)
	@if git rev-parse --git-dir > /dev/null 2>&1; then \
		$(BIN)/nbstripout --install --attributes .gitattributes && \
		git config filter.nbstripout.extrakeys "$(NBSTRIPOUT_KEYS)"; fi

# strip outputs and volatile metadata from the notebooks on disk (git already stores them stripped); rewrites only
# the files a save after Run All changed. `make test` runs it: a notebook saved with outputs never fails the tests.
notebooks-clean: venv
	@for nb in notebooks/*.ipynb; do \
		$(BIN)/nbstripout --verify --extra-keys "$(NBSTRIPOUT_KEYS)" "$$nb" > /dev/null || { \
		$(BIN)/nbstripout --extra-keys "$(NBSTRIPOUT_KEYS)" "$$nb" && echo "stripped outputs from $$nb"; }; done

# HTML reports (figures inline, widget state saved) of notebooks 01-03 (those with a preset), executed with PRESET
# into REPORT_DIR; `make report PRESET=paper` for the papers' settings. Already executed notebooks (e.g. a sweep's
# runs of 04): zsad report FILES_OR_DIRS --out DIR
PRESET     ?= quick
REPORT_DIR ?= outputs/reports
report: venv
	$(BIN)/zsad report $(wildcard notebooks/0[1-3]_*.ipynb) --execute --preset $(PRESET) --out $(REPORT_DIR)

test: venv notebooks-clean
	$(TEST_ENV) $(BIN)/python -m pytest -q -rs

# unit tests only (no notebook runs)
test-fast: venv notebooks-clean
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not notebook"

demo: venv
	$(BIN)/zsad demo

# every notebook at its smoke parameters, as one sweep, against tests/notebooks/expected: a table of what moved
regress: venv
	rm -rf outputs/regress/runs
	$(TEST_ENV) $(BIN)/python -m zsadlib.sweep.regress --out outputs/regress

data: venv
	$(BIN)/zsad data synth --out data/synthetic

bench: venv
	$(BIN)/python bench/bench_metrics.py
	$(BIN)/python bench/bench_flops.py
	$(BIN)/python bench/bench_method.py --method anomalyclip
	$(BIN)/python bench/bench_method.py --method crane --batch-size 1
	$(BIN)/python bench/bench_method.py --method vip2clip --batch-size 1

# mutation testing of zsadlib/metrics.py, ops.py and losses.py (slow: ~2200 mutants, about 40 min on 2 cores;
# `make mutants MUTANTS='zsadlib.losses*'` runs a subset). mutmut is installed here only, never by `make test`.
MUTMUT   := mutmut==3.8.1
MUTANTS  ?=
mutants: venv
	$(BIN)/python -m pip install --quiet "$(MUTMUT)"
	$(TEST_ENV) $(BIN)/mutmut run $(MUTANTS)
	$(BIN)/mutmut results

lab: venv
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache mutants
