# `make run`: the main job (train the tiny model, quantize, compare, start the demo).
# `make test`: the test suite. Both create or reuse .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# a local copy of the datasets when there is one beside the project (as on CI); else download
NANOGPTQ_DATA_DIR ?= $(if $(wildcard ../shared/data/tinyshakespeare/input.txt),$(abspath ../shared/data),)
export NANOGPTQ_DATA_DIR
export GRADIO_ANALYTICS_ENABLED := False
RUN ?= runs/tiny-shakespeare

.PHONY: install run test lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m nanogptq.cli train --preset tiny --dataset shakespeare --out-dir $(RUN) --max-steps 2500 \
		$(if $(wildcard $(RUN)/last/config.json),--resume,)
	$(PY) -m nanogptq.cli eval $(RUN)/best
	$(PY) -m nanogptq.cli sample $(RUN)/best --prompt "ROMEO:" --max-new-tokens 300

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check nanogptq tests benchmarks

clean:
	rm -rf $(VENV) runs
