# Twarga Lab. On a fresh Debian 12 machine, as root:
#   make run           install everything, start libvirtd, build the default image, create
#                      the first admin and bring up JupyterHub on http://127.0.0.1:8000
#   make test          install everything and run the whole test suite
#   make run-personal  one-person mode: JupyterLab with Twarga on http://127.0.0.1:8888
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := $(CURDIR)/.venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.twarga-installed
IMAGES_DIR  := $(CURDIR)/vms/images
APT_PACKAGES := \
	libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc python3.11 python3-dev \
	qemu-system-x86 qemu-utils busybox-static linux-image-cloud-amd64 dropbear-bin \
	cpio genisoimage openssh-client sshpass procps curl chromium fail2ban postgresql \
	mmdebstrap e2fsprogs vde2
PYTEST_ARGS ?=

STATE_DIR   ?= $(CURDIR)/vms/private
# Only the Hub targets get these: tests make their own databases.
HUB_ENV     := TWARGA_STATE_DIR=$(STATE_DIR) TWARGA_DB_URL=sqlite:///$(STATE_DIR)/twarga.db
export TWARGA_IMAGES_DIR := $(IMAGES_DIR)
CHP         := $(CURDIR)/node_modules/.bin/configurable-http-proxy
# Debian's interpreter: users' servers run as other accounts and must be able to run it.
export UV_PYTHON := /usr/bin/python3.11

.PHONY: help system-deps deps services image image-debian image-debian-background admin run run-personal test lint test-labextension bench clean

help:
	@echo "make run          - install everything and bring up Twarga Lab's JupyterHub on :8000"
	@echo "make run-personal - one-person JupyterLab with Twarga Lab on :8888"
	@echo "make test         - install everything and run the whole test suite"
	@echo "make bench        - run the benchmarks (they print ratios)"

# apt-get only when a package is missing: a warm machine skips the slow part. Daemons
# installed on the way (fail2ban, libvirtd) are not started by apt: we start what we use.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "apt-get install $$missing"; \
		policy=/usr/sbin/policy-rc.d; made=; \
		if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy; chmod +x $$policy; made=1; fi; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $$missing; status=$$?; \
		[ -z "$$made" ] || rm -f $$policy; \
		exit $$status; \
	fi
	@command -v npm >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q --no-install-recommends nodejs npm; }
	@command -v uv >/dev/null || python3 -m pip install --quiet uv

LAB_SOURCES := labextension/package.json labextension/yarn.lock labextension/.yarnrc.yml \
	labextension/tsconfig.json $(wildcard labextension/src/*.ts labextension/style/*)

# The build hook compiles the JupyterLab extension (labextension/) into the package.
$(STAMP): pyproject.toml uv.lock $(LAB_SOURCES) | system-deps
	rm -rf twarga_lab/labextension
	uv sync --frozen --reinstall-package twarga-lab
	touch $@

$(CHP): package.json package-lock.json | system-deps
	npm ci --no-audit --no-fund
	touch $@

deps: system-deps $(STAMP) $(CHP)

# No systemd here: start the daemons by hand when they are not running.
services: system-deps
	@pgrep -x virtlogd >/dev/null || virtlogd -d
	@pgrep -x libvirtd >/dev/null || libvirtd -d
	@for i in $$(seq 1 60); do virsh -c qemu:///system version >/dev/null 2>&1 && exit 0; sleep 0.5; done; \
		echo "libvirtd did not answer on qemu:///system" >&2; exit 1

image: deps
	$(BIN)/twarga-lab image build --images-dir $(IMAGES_DIR)

# debian/12 from Debian's archive with mmdebstrap: minutes the first time, then cached.
image-debian: deps image
	$(BIN)/twarga-lab image build debian-12 --images-dir $(IMAGES_DIR)

# For `make run`: the same build in the background, so the Hub does not wait for it.
image-debian-background: deps image
	@echo "building debian/12 in the background; log: $(IMAGES_DIR)/debian-12-build.log"
	@setsid nohup $(BIN)/twarga-lab image build debian-12 --images-dir $(IMAGES_DIR) \
		>$(IMAGES_DIR)/debian-12-build.log 2>&1 </dev/null &

# The first admin's password is printed once (or taken from $$TWARGA_ADMIN_PASSWORD).
admin: deps
	@mkdir -p $(STATE_DIR) && chmod 700 $(STATE_DIR)
	$(HUB_ENV) $(BIN)/twarga-lab create-admin

run: deps services image image-debian-background admin
	@echo "Twarga Lab: http://127.0.0.1:8000 (sign up at /hub/signup, approve at /hub/twarga-accounts)"
	cd $(STATE_DIR) && $(HUB_ENV) $(BIN)/jupyterhub -f $(CURDIR)/hub_config/jupyterhub_config.py

run-personal: deps services image
	$(BIN)/twarga-lab run --images-dir $(IMAGES_DIR)

lint: deps
	$(BIN)/ruff check twarga_lab tests bench
	$(BIN)/ruff format --check twarga_lab tests bench

# The JupyterLab extension's ESLint/Prettier checks and its jest unit tests (its
# scripts call jlpm, which is in the venv).
test-labextension: deps
	cd labextension && export PATH="$(BIN):$$PATH" && jlpm install --immutable && \
		jlpm lint:check && jlpm test

test: deps services image image-debian lint test-labextension
	$(BIN)/pytest -p no:cacheprovider $(PYTEST_ARGS) tests

bench: deps services image
	$(BIN)/python bench/vm_lifecycle.py
	$(BIN)/python bench/metrics.py
	$(BIN)/python bench/soc.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/host_images.py

clean:
	rm -rf $(VENV) vms/instances vms/*.db*
