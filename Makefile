# Keel — top-level build. `make run` boots Keel, `make test` runs every test. Both install what they need.
#
# Debian packages a component needs are listed one per line in <component>/debian-packages.txt,
# Python packages in <component>/pip-packages.txt; `make deps` installs them all (idempotent, quick when present).

SHELL        := /bin/bash
CARGO        ?= cargo
TARGET       := x86_64-unknown-linux-gnu
RELEASE_DIR  := target/$(TARGET)/release
DEB_PKGS     := $(sort $(shell cat */debian-packages.txt 2>/dev/null | sed 's/\#.*//'))
PIP_PKGS     := $(sort $(shell cat */pip-packages.txt 2>/dev/null | sed 's/\#.*//'))
STAMP        := target/.deps-stamp

.PHONY: all build deps test test-unit test-host run run-host bench clean fmt lint

all: build

$(STAMP): $(wildcard */debian-packages.txt) $(wildcard */pip-packages.txt)
	@mkdir -p target
	@missing=""; for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi
	@if [ -n "$(PIP_PKGS)" ]; then python3 -m pip install -q --disable-pip-version-check $(PIP_PKGS); fi
	@touch $@

deps: $(STAMP)

build: deps
	$(CARGO) build --release --workspace --bins

test: deps
	$(CARGO) build --release --workspace --bins
	$(CARGO) test --release --workspace -- --test-threads=2

run: build
	./scripts/run-host.sh

bench: build
	./scripts/bench.sh

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf out
