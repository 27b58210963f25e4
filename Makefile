# Keel — top-level build. `make run` boots Keel, `make test` runs every test. Both install what they need.
#
# Debian packages are listed one per line in ./debian-packages.txt (what building needs) and in each component's
# <component>/debian-packages.txt, Python packages in <component>/pip-packages.txt; `make deps` installs them
# (idempotent; quick when everything is present), the Python ones into target/python (tests put it on PYTHONPATH).
# QEMU comes from bookworm-backports: the build machines ship qemu-utils 10 from there, which conflicts with
# bookworm's own qemu-system-x86 7.2.

SHELL        := /bin/bash
CARGO        ?= cargo
TEST_TIMEOUT ?= 50m
TARGET       := x86_64-unknown-linux-gnu
RELEASE_DIR  := target/$(TARGET)/release
DEB_PKGS     := $(sort $(shell cat debian-packages.txt */debian-packages.txt 2>/dev/null | sed 's/\#.*//'))
PIP_PKGS     := $(sort $(shell cat */pip-packages.txt 2>/dev/null | sed 's/\#.*//'))
STAMP        := target/.deps-stamp
PY_DIR       := target/python
BACKPORTS    := /etc/apt/sources.list.d/keel-backports.sources
APT_INSTALL  := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.PHONY: all build deps test test-fast image run run-uefi run-host bench bench-image lint clean

all: build

$(STAMP): Makefile debian-packages.txt $(wildcard */debian-packages.txt) $(wildcard */pip-packages.txt)
	@mkdir -p target
	@missing=""; for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "make deps: installing Debian packages:$$missing"; \
	  apt-get update -qq && $(APT_INSTALL) $$missing; fi
	@if ! command -v qemu-system-x86_64 >/dev/null; then \
	  echo "make deps: installing qemu-system-x86 from bookworm-backports"; \
	  [ -e $(BACKPORTS) ] || grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/ || \
	    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > $(BACKPORTS); \
	  apt-get update -qq && $(APT_INSTALL) -t bookworm-backports qemu-system-x86; fi
	@# Into the build tree, not the system: Debian's python3 refuses system-wide pip installs (PEP 668).
	@if [ -n "$(PIP_PKGS)" ]; then echo "make deps: installing Python packages into $(PY_DIR): $(PIP_PKGS)"; \
	  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --upgrade --target $(PY_DIR) $(PIP_PKGS); fi
	@touch $@

deps: $(STAMP)

build: deps
	$(CARGO) build --release --workspace --bins

# Every test: unit tests, host integration tests (real processes in namespaces and cgroups, real clusters on
# loopback, real clients), and the QEMU tests (the tests build the image themselves). QEMU must be present.
test: build
	@# A hung test must fail the run, not hold CI until its own limit: the suite takes ≈ 23–27 min here (2 cores; 7–9 of them `make build`).
	KEEL_REQUIRE_QEMU=1 KEEL_REQUIRE_TOOLS=1 timeout --kill-after=30s $(TEST_TIMEOUT) $(CARGO) test --release --workspace -- --test-threads=2 \
	  || { rc=$$?; [ $$rc -ne 124 ] || echo "make test: stopped after $(TEST_TIMEOUT); a test hung (the last 'Running' line above names its suite)"; exit $$rc; }

# Everything but the QEMU tests.
test-fast: build
	$(CARGO) test --release --workspace --exclude keel-tests -- --test-threads=2

# The image trusts the update keys in out/keys; a development key pair is generated there on first use
# (keep out/keys/*.key secret; sign payloads with it: docs/updater.md "Publishing an update").
image: build
	@ls out/keys/*.pub >/dev/null 2>&1 || $(RELEASE_DIR)/mkpayload keygen --out out/keys
	$(RELEASE_DIR)/mkimage --out out --update-key out/keys

# Boot the image in QEMU (direct kernel boot) as a single-node machine; the console is this terminal, logged in
# as root (try `initctl list`, `clusterctl status`). Ctrl-A X quits. `make run-uefi` takes the firmware path.
run: image
	$(RELEASE_DIR)/keelvm run --out out --fresh --user-data image/examples/single-node.yml

run-uefi: image
	$(RELEASE_DIR)/keelvm run --out out --fresh --uefi --user-data image/examples/single-node.yml

# Keel's init as PID 1 of a PID namespace on this host, with the demo units (no VM).
run-host: build
	./scripts/run-host.sh

bench: build
	./scripts/bench.sh

bench-image: build
	$(CARGO) test --release -p keel-tests --test integration -- --ignored --nocapture bench_boot::

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf out
