# dist-dpo. `make` (or `make help`) lists the targets.
# Strategy (how to distribute: the target) and recipe (what to train: RECIPE) combine freely, e.g.
#   make train-zero3 RECIPE=recipes/seed_qlora.yaml NGPUS=4 ARGS="--max_steps 50 --output_dir outputs/z3"
# Each train-* target is one line over launch/*.sh, which you can run directly the same way.

PYTHON ?= .venv/bin/python
RECIPE ?= recipes/seed_qlora.yaml
NGPUS ?=
ARGS ?=
STAGE ?= zero3
PYTEST_ARGS ?=
DEMO_DIR ?= outputs/demo

# The launch scripts read these from the environment. An empty NGPUS means "count the visible GPUs".
export PYTHON NGPUS

VENV_STAMP := .venv/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo test train-ddp train-fsdp train-zero2 train-zero3 train-zero3-offload \
	train-deepspeed train-torchrun clean distclean

help: ## List the targets (the default)
	@echo "usage: make TARGET [RECIPE=recipes/x.yaml] [NGPUS=n] [ARGS='--key value ...']"
	@echo
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-21s %s\n", $$1, $$2}'

install: $(VENV_STAMP) ## Create .venv and install dist-dpo (editable, with test extras) pinned by constraints.txt

# A stamp, so `make install` (and every target that needs it) is instant until pyproject.toml or constraints.txt change.
$(VENV_STAMP): pyproject.toml constraints.txt
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/pip install -c constraints.txt -e '.[test]'
	touch $@

demo: install ## The CPU demo: tiny built-in model, 2 processes, a fresh run in DEMO_DIR (outputs/demo)
	rm -rf $(DEMO_DIR)  # a fresh run: a finished run there would otherwise be refused, a partial one resumed
	launch/demo_cpu.sh --output_dir $(DEMO_DIR) $(ARGS)
	@echo
	@echo "adapter: $(DEMO_DIR)/adapter_model.safetensors (+ adapter_config.json)"
	@echo "logs:    $(DEMO_DIR)/logs/rank0.log, rank1.log"
	@echo "metrics: $(DEMO_DIR)/train_results.json, trainer_state.json (log_history)"

test: install ## Run the CPU test suite (PYTEST_ARGS='-k launch' to select)
	$(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

train-ddp: ## DDP on every visible GPU (accelerate_configs/ddp.yaml)
	launch/accelerate.sh ddp $(RECIPE) $(ARGS)

train-fsdp: ## FSDP2, weights sharded across GPUs (accelerate_configs/fsdp.yaml)
	launch/accelerate.sh fsdp $(RECIPE) $(ARGS)

train-zero2: ## DeepSpeed ZeRO-2 via accelerate (ds_configs/zero2.json)
	launch/accelerate.sh zero2 $(RECIPE) $(ARGS)

train-zero3: ## DeepSpeed ZeRO-3 via accelerate (ds_configs/zero3.json)
	launch/accelerate.sh zero3 $(RECIPE) $(ARGS)

train-zero3-offload: ## DeepSpeed ZeRO-3 + CPU offload via accelerate (ds_configs/zero3_offload.json)
	launch/accelerate.sh zero3_offload $(RECIPE) $(ARGS)

train-deepspeed: ## The `deepspeed` launcher with ds_configs/$(STAGE).json (STAGE=zero2|zero3|zero3_offload)
	launch/deepspeed.sh $(STAGE) $(RECIPE) $(ARGS)

train-torchrun: ## Plain torchrun: DDP (add ARGS='--deepspeed ds_configs/zero3.json' for ZeRO)
	launch/torchrun.sh $(RECIPE) $(ARGS)

clean: ## Remove outputs/, runs/ and caches (never the venv)
	rm -rf outputs runs .cache .pytest_cache *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## clean, and remove .venv too
	rm -rf .venv
