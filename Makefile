# The two commands a new user needs:  make quickstart   and   make test
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -euo pipefail -c

QUICKSTART := examples/quickstart.yaml --pvc quickstart-data=examples/data

.PHONY: quickstart test test-unit generate cluster cluster-down image

quickstart:  ## fine-tune the packaged SmolLM2 on 2 CPU ranks, then compare base vs adapter
	VENV=$$(scripts/env.sh)
	"$$VENV/bin/lorafinetune" run $(QUICKSTART)
	"$$VENV/bin/lorafinetune" evaluate $(QUICKSTART)

test:  ## every test: unit, multi-process training, operator on a real control plane, Prometheus, the quick start
	scripts/test-deps.sh
	VENV=$$(scripts/env.sh)
	"$$VENV/bin/python" -m pytest -v -p no:cacheprovider --durations=30 $(PYTEST_ARGS)  # where the time went, at the end

test-unit:  ## the fast ones only
	VENV=$$(scripts/env.sh)
	"$$VENV/bin/python" -m pytest tests/unit -q $(PYTEST_ARGS)

generate:  ## regenerate crds/ (from lorafinetune/api) and the chart's values, schema and copies (lorafinetune/generate)
	VENV=$$(scripts/env.sh)
	"$$VENV/bin/python" -m lorafinetune.generate --write

cluster:  ## start the local control plane (builds it once); prints the kubeconfig to export
	@hack/cluster/up.sh

cluster-down:  ## stop it
	@hack/cluster/down.sh

image:  ## build the trainer and operator images with podman; where Docker Hub is out of reach: BASE=localhost/lorafinetune-base:bookworm make image
	@hack/image/build.sh
