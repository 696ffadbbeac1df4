# ckstream: the two entry points for a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
export CKSTREAM_BIN := $(CURDIR)/target/release/ckstream

.PHONY: demo test deps build unit-and-integration fuzz-smoke fuzz lint bench install clean

## Install what is needed, build, pack and unpack a sample, print what happened.
demo: deps build
	scripts/demo.sh

## Install what is needed and run every test (CI runs this as root).
test: deps build lint unit-and-integration fuzz-smoke
	@scripts/test-summary.sh target/test-output.log

deps:
	scripts/install-deps.sh --with-criu --with-podman

build:
	$(CARGO) build --release --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --locked --all-targets -- -D warnings

# Privileged tests (loopback btrfs/XFS, real CRIU) fail instead of skipping here.
unit-and-integration:
	set -o pipefail; CKSTREAM_REQUIRE_PRIVILEGED=1 $(CARGO) test --release --locked --workspace 2>&1 | tee target/test-output.log

fuzz-smoke:
	scripts/fuzz-smoke.sh

## Every fuzz target, one after the other, FUZZ_SECS seconds each (docs/FUZZING.md).
FUZZ_SECS ?= 300
fuzz: build
	FUZZ_RUNS=$(FUZZ_RUNS) scripts/fuzz.sh $(FUZZ_SECS)

## Every benchmark (root; long: see docs/PERFORMANCE.md for each one's settings).
bench: build
	NO_BUILD=1 bench/pack-bench.sh
	NO_BUILD=1 bench/criu-bench.sh
	NO_BUILD=1 bench/mount-bench.sh
	NO_BUILD=1 bench/s3-bench.sh
	bench/podman-bench.sh

## Install to $(PREFIX)/bin, with criu-image-streamer as a drop-in alias.
PREFIX ?= /usr/local
install: build
	install -D -m 0755 target/release/ckstream $(PREFIX)/bin/ckstream
	ln -sf ckstream $(PREFIX)/bin/criu-image-streamer

clean:
	$(CARGO) clean
