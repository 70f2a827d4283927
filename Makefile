# Two commands on a fresh machine: `make demo` (the main job on the embedded toy world) and `make test`.
# Both create the same venv. On a CPU machine torch is pinned to the CPU wheel 2.13.0; real users
# install with a plain `pip install lcmkit` and get whatever torch their platform provides.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint clean

$(STAMP): pyproject.toml constraints-cpu.txt
	@echo "lcmkit: first-time set-up of $(VENV) (about 2 minutes): torch (CPU), then lcmkit and its libraries"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install --progress-bar on -c constraints-cpu.txt torch==2.13.0 | grep -v "^Requirement already" || true
	$(BIN)/pip install --progress-bar on -c constraints-cpu.txt -e '.[dev]' | grep -E "^(Collecting|Installing|Successfully)" || true
	# only the CLIP BPE vocabulary file of this wheel is used (it would pull torchvision otherwise)
	$(BIN)/pip install -q --no-deps open_clip_torch
	$(BIN)/python -c "import lcmkit, torch, diffusers" && touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/ruff check src tests
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lcmkit demo

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV)
