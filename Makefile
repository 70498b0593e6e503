# `make run`: the main job (train the tiny model, quantize, compare, start the demo).
# `make test`: the test suite. Both create or reuse .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# a local copy of the datasets when there is one beside the project (as on CI); else download
NANOGPTQ_DATA_DIR ?= $(if $(wildcard ../shared/data/tinyshakespeare/input.txt),$(abspath ../shared/data),)
export NANOGPTQ_DATA_DIR
export GRADIO_ANALYTICS_ENABLED := False
RUN ?= runs/tiny-shakespeare
# the main job's training: the recipe measured on 2 cores (docs/results.md#the-main-job); 1,300 steps of batch 24 take
# about 190 s on a quiet 2-core machine (cpu_budget.sh's rate); the learning rate decays by the clock too, so a
# slower machine ends its cosine at the budget
STEPS ?= 1300
TIME ?= 210
Q := $(PY) -m nanogptq.cli quantize $(RUN)/best
VARIANTS := best rtn-int8 gptq-int8 rtn-int3 gptq-int3 gptq-bpw2.5

.PHONY: install install-run run test lint figures clean

# the test suite's tools (pytest, playwright, llama-cpp-python built from source, transformers ...)
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	touch $@ $(VENV)/.installed-run

# the main job needs the package alone (torch, gradio, matplotlib ...): minutes less from a fresh clone
$(VENV)/.installed-run: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e .
	touch $@

install: $(VENV)/.installed
install-run: $(VENV)/.installed-run

# fp32, round to nearest and GPTQ (the default quality setting) at 8 and 3 bits, and a 2.5 bits/weight mix
run: install-run
	$(PY) -m nanogptq.cli train --preset tiny --dataset shakespeare --split tail --out-dir $(RUN) \
		--max-steps $(STEPS) --max-time $(TIME) --time-schedule --batch-size 24 --lr 4e-3 --min-lr 2e-4 \
		--weight-decay 0.6 --warmup-steps 50 --eval-interval 200 --eval-batches 10 \
		$(if $(wildcard $(RUN)/last/config.json),--resume,)
	$(Q) --method rtn --bits 8 --group-size -1 --out $(RUN)/rtn-int8
	$(Q) --method gptq --bits 8 --group-size -1 --out $(RUN)/gptq-int8
	$(Q) --method rtn --bits 3 --group-size 64 --out $(RUN)/rtn-int3
	$(Q) --method gptq --bits 3 --group-size 64 --out $(RUN)/gptq-int3
	$(Q) --method gptq --target-bpw 2.5 --out $(RUN)/gptq-bpw2.5
	$(PY) -m nanogptq.cli compare $(addprefix $(RUN)/,$(VARIANTS)) --out $(RUN)/report
	$(PY) -m nanogptq.cli sample $(RUN)/gptq-int3 --prompt "ROMEO:" --max-new-tokens 200
	$(PY) -m nanogptq.cli demo $(addprefix $(RUN)/,$(VARIANTS)) --report $(RUN)/report

test: install
	$(PY) -m pytest -q

figures: install  # every figure in docs/results.md (GPU parts only where CUDA is present)
	PY=$(abspath $(PY)) bash benchmarks/reproduce.sh

lint: install
	$(VENV)/bin/ruff check nanogptq tests benchmarks

clean:
	rm -rf $(VENV) runs
