# Mailroom: build, run and test. `make test` is the one command that runs every test.
CARGO ?= cargo
FUZZ_SECONDS ?= 15

.PHONY: run test deps tools lint unit integration python fuzz-smoke bench

## Build and run `mailroom serve` on the embedded default config (config/mailroom.yaml).
run:
	$(CARGO) run --release -p mailroom -- serve

## Every test: lint, Rust unit + transcript tests, Python end-to-end tests, fuzz smoke run.
test: deps lint unit python fuzz-smoke
	@echo "== all tests passed"

deps:
	@./scripts/test-deps.sh

## Build the test binaries (nats-server, ...) into ~/.cache/mailroom/tools.
tools:
	@./e2e/tools/build.sh >/dev/null

lint:
	@echo "== cargo fmt --check, clippy -D warnings"
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	@echo "== cargo test (unit tests and transcript tests over real TCP)"
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace

python:
	@echo "== end-to-end tests with real clients (smtplib, swaks, smtp-source)"
	$(CARGO) build -p mailroom
	python3 -m pytest -q tests/python

fuzz-smoke:
	./scripts/fuzz-smoke.sh $(FUZZ_SECONDS)

bench:
	./bench/run.sh
