# es-ray: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?=
STATE  ?= .es-ray
# Items per reindex run. The model forward pass is the cost: about 25 items/s on 2 cores, so
# 10000,50000,100000 (the full benchmark) takes about two hours there; minutes on a GPU.
REINDEX_SIZES ?= 2500,5000,10000

.PHONY: venv browser demo test bench quality load idle up down status clean

# The venv is (re)built when pyproject.toml changes. torch comes first, pinned to the CPU wheel,
# so no dependency can pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/es-ray up --state-dir $(STATE)
	$(BIN)/es-ray demo --state-dir $(STATE) $(if $(DATA),--data $(DATA))

# The web page test drives Debian's chromium through Playwright (never `playwright install`, which
# downloads its own browser builds). Installed here when missing and we are root with apt-get.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the web page test"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
			|| echo "browser: installing chromium failed; tests/test_web_page.py will be skipped"; \
	else \
		echo "browser: /usr/bin/chromium is missing and cannot be installed here (needs root and apt-get);" \
		     "install Debian's chromium package, or tests/test_web_page.py is skipped"; \
	fi

# --durations: the slowest tests at the end of every run (the suite's time budget is 20 minutes on 2 cores).
test: venv browser
	$(BIN)/python -m pytest -q -rs --durations=15 tests

# Benchmarks start their own stack under /tmp; results go to bench/results/*.json and BENCHMARKS.md.
bench: venv
	$(BIN)/python -m es_ray.bench.runtimes --ndcg torch,onnx,onnx-int8 $(if $(DATA),--data $(DATA))
	$(BIN)/python -m es_ray.bench.ingest $(if $(DATA),--data $(DATA))
	$(BIN)/python -m es_ray.bench.search $(if $(DATA),--data $(DATA))
	$(BIN)/python -m es_ray.bench.growth --ef-search 40,200 $(if $(DATA),--data $(DATA))
	$(BIN)/python -m es_ray.bench.clicks
	$(BIN)/python -m es_ray.bench.idle --start --state-dir /tmp/esr-bench-idle
	$(BIN)/python -m es_ray.bench.load
	$(BIN)/python -m es_ray.bench.priority
	$(BIN)/es-ray down --state-dir /tmp/esr-bench
	$(BIN)/python -m es_ray.bench.improve $(if $(DATA),--data $(DATA))
	$(BIN)/es-ray down --state-dir /tmp/esr-bench-improve
	$(BIN)/python -m es_ray.bench.finetune $(if $(DATA),--data $(DATA))
	$(BIN)/es-ray down --state-dir /tmp/esr-bench-finetune
	$(BIN)/python -m es_ray.bench.hybrid --data $(if $(DATA),$(DATA),../shared/data/scifact)
	@if [ -z "$(DATA)" ] && [ -d ../shared/data/cranfield ]; then \
		$(BIN)/python -m es_ray.bench.hybrid --data ../shared/data/cranfield; \
	else echo "hybrid: ../shared/data/cranfield is absent (or DATA is set): Cranfield not measured"; fi
	$(MAKE) quality
	$(BIN)/python -m es_ray.bench.reindex --sizes $(REINDEX_SIZES)
	$(BIN)/es-ray down --state-dir /tmp/esr-bench-reindex

# Learning from clicks, offline (no stack): SciFact (or DATA), then Cranfield with the same settings where
# ../shared/data has it. Hours on 2 cores (3 click seeds x 2 methods x 2 noise levels per collection).
quality: venv
	$(BIN)/python -m es_ray.bench.quality $(if $(DATA),--data $(DATA))
	$(BIN)/python -m es_ray.bench.guards $(if $(DATA),--data $(DATA))
	@if [ -z "$(DATA)" ] && [ -d ../shared/data/cranfield ]; then \
		$(BIN)/python -m es_ray.bench.quality --data ../shared/data/cranfield; \
		$(BIN)/python -m es_ray.bench.guards --data ../shared/data/cranfield; \
	else echo "quality: ../shared/data/cranfield is absent (or DATA is set): Cranfield not measured"; fi

# 8 search clients with clicks and upserts for LOAD_SECONDS, then Postgres restarted, Triton killed and
# the Serve replica killed under that load (loopback only); bench/results/load-synthetic.json. Then
# DEPLOY_CYCLES new model versions deployed and undeployed through the lifecycle driver under that load;
# bench/results/load-deploy.json. Then an attacker from 127.0.0.2 beside anonymous people
# (es_ray/bench/attack.py); bench/results/load-attack.json.
LOAD_SECONDS ?= 180
DEPLOY_CYCLES ?= 30
load: venv
	$(BIN)/python -m es_ray.bench.load --seconds $(LOAD_SECONDS) --deploy-cycles $(DEPLOY_CYCLES)
	$(BIN)/es-ray down --state-dir /tmp/esr-bench

# The stack of STATE (after `make demo`) idle for 60 s: CPU share, memory (PSS), the top processes;
# bench/results/idle-<cores>cores.json. `make bench` measures a stack of its own instead.
idle: venv
	$(BIN)/python -m es_ray.bench.idle --state-dir $(STATE)

up: venv
	$(BIN)/es-ray up --state-dir $(STATE)

down:
	$(BIN)/es-ray down --state-dir $(STATE)

status:
	$(BIN)/es-ray status --state-dir $(STATE)

clean: down
	rm -rf $(STATE)
