# Two commands do all set-up on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lock demo test lint bench clean

install: $(STAMP)

# constraints.txt is the lock: every package the project, its tests and the demo install, pinned
# (`make lock` rewrites it). torch first, on its own: `torch==2.13.0` carries no local label, so a CPU
# machine gets the CPU wheel its pip index offers and a GPU host the CUDA build of the same release;
# the lock then keeps it while peft/accelerate/bitsandbytes resolve (unpinned they pull ~3 GB of
# CUDA torch). `all`: every optional feature (pyproject.toml's extras), which the demo and tests use.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all,test,scale]'
	touch $(STAMP)

# Rewrite the lock after changing pyproject.toml's requirements (install first picks up a new one):
# the installed versions of what pyproject.toml requires, transitively; nothing else in the venv.
lock: install
	$(BIN)/python docker/lock.py

demo: install
	$(BIN)/refinery demo

test: install
	$(BIN)/python -m pytest -q

# ruff and the type checker (configured in pyproject.toml); .ci/run runs this before the tests.
lint: install
	$(BIN)/ruff check .
	rm -rf .typecheck && mkdir -p .typecheck/refinery
	ln -s ../../flows .typecheck/refinery/flows && ln -s ../../tasks .typecheck/refinery/tasks
	$(BIN)/mypy -p refinery

bench: install
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf refinery-work .pytest_cache
