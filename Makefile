# The two set-up commands of README.md: `make run` and `make test`.
VENV  ?= .venv
BIN   := $(VENV)/bin
MODEL ?= smollm2-135m
CONFIG ?= examples/edged.yaml

.PHONY: setup run test bench clean
setup:
	@./scripts/bootstrap.sh

# Pulls MODEL, then serves it; starts a mosquitto for the session when no broker listens (scripts/run.sh).
run: setup
	VENV=$(VENV) MODEL=$(MODEL) CONFIG=$(CONFIG) ./scripts/run.sh

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/edged pull $(MODEL)
	$(BIN)/python -m bench --model $(MODEL) --transport

clean:
	rm -rf $(VENV) .cache .pytest_cache

# Slow (minutes, qemu): build the aarch64 bundle and verify it under emulation. Not part of `make test`.
.PHONY: test-arm
test-arm: setup
	./build-arm.sh --verify

# Install as a systemd service (root): user/group, venv in /opt/edged, /etc/edged, units.
# make install BOARD=pi4   (generic | pi4 | pi5 | zero2w); see docs/operations.md.
BOARD ?= generic
.PHONY: install
install:
	./scripts/install.sh --board $(BOARD) $(INSTALL_ARGS)
