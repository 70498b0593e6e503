# `make run`: the main job (train the tiny model, quantize, compare, start the demo).
# `make test`: the test suite. Both create or reuse .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# a local copy of the datasets when there is one beside the project (as on CI); else download
NANOGPTQ_DATA_DIR ?= $(if $(wildcard ../shared/data/tinyshakespeare/input.txt),$(abspath ../shared/data),)
export NANOGPTQ_DATA_DIR
export GRADIO_ANALYTICS_ENABLED := False
RUN ?= runs/tiny-shakespeare
STEPS ?= 1000

.PHONY: install run test lint figures clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m nanogptq.cli train --preset tiny --dataset shakespeare --split tail --out-dir $(RUN) \
		--max-steps $(STEPS) --batch-size 16 --lr 3e-3 --min-lr 3e-4 --warmup-steps 50 --eval-interval 100 \
		--eval-batches 10 $(if $(wildcard $(RUN)/last/config.json),--resume,)
	$(PY) -m nanogptq.cli quantize $(RUN)/best --method rtn --bits 8 --group-size -1 --out $(RUN)/rtn-int8
	$(PY) -m nanogptq.cli quantize $(RUN)/best --method gptq --bits 8 --group-size -1 --out $(RUN)/gptq-int8
	$(PY) -m nanogptq.cli quantize $(RUN)/best --method gptq --bits 4 --group-size 64 --act-order \
		--out $(RUN)/gptq-int4
	$(PY) -m nanogptq.cli compare $(RUN)/best $(RUN)/rtn-int8 $(RUN)/gptq-int8 $(RUN)/gptq-int4 --out $(RUN)/report
	$(PY) -m nanogptq.cli sample $(RUN)/gptq-int4 --prompt "ROMEO:" --max-new-tokens 200
	$(PY) -m nanogptq.cli demo $(RUN)/best $(RUN)/rtn-int8 $(RUN)/gptq-int8 $(RUN)/gptq-int4 --report $(RUN)/report

test: install
	$(PY) -m pytest -q

figures: install  # every figure in docs/results.md (GPU parts only where CUDA is present)
	PY=$(abspath $(PY)) bash benchmarks/reproduce.sh

lint: install
	$(VENV)/bin/ruff check nanogptq tests benchmarks

clean:
	rm -rf $(VENV) runs
