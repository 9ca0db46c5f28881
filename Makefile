# Two commands a lab needs: `make run` (the demo case through the whole system) and `make test`.
# Both create .venv on first use. Model building uses a separate .venv-train (torch, nncf).

PYTHON ?= python3
VENV := .venv
TRAIN_VENV := .venv-train
DATA ?= ../shared/data/idc_breast_histopathology
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: run test test-slow model demo-case bench clean browser

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

$(TRAIN_VENV)/.installed: pyproject.toml
	test -x $(TRAIN_VENV)/bin/python || $(PYTHON) -m venv $(TRAIN_VENV)
	$(TRAIN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[train,dev]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/appliance demo

test: $(VENV)/.installed browser
	$(VENV)/bin/python -m pytest -q

# Debian's headless Chromium and its driver, for the tests that open the site report in a real browser
# (installed when run as root; otherwise those tests are skipped and say why)
browser:
	@if [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null; } || \
			echo "could not install chromium: the browser tests will be skipped"; \
		else echo "chromium is not installed (as root: apt-get install chromium chromium-driver); the browser tests will be skipped"; fi; \
	fi

# every long run, the real-systemd container test included (root; about 15 minutes)
test-slow: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -s -m slow

model: $(TRAIN_VENV)/.installed
	$(TRAIN_VENV)/bin/python models/tools/build_idc_model.py --data $(DATA) --out models/idc-resnet
	$(TRAIN_VENV)/bin/python models/tools/drift_reference.py --data $(DATA) --model-dir models/idc-resnet

demo-case: $(VENV)/.installed
	$(VENV)/bin/python scripts/build_demo_case.py --data $(DATA)

clean:
	rm -rf var .pytest_cache

# Install on the bench PC as the systemd service `appliance` (README "Install on the bench PC"); needs root:
#   sudo make install SCANNER_VENDOR_ID=0403 SCANNER_PRODUCT_ID=6001     (ids from lsusb)
# `make uninstall` keeps /var/lib/appliance and /etc/appliance; `make uninstall PURGE=1` removes them too.
.PHONY: install uninstall
install:
	SCANNER_VENDOR_ID='$(SCANNER_VENDOR_ID)' SCANNER_PRODUCT_ID='$(SCANNER_PRODUCT_ID)' \
		SCANNER_SERIAL='$(SCANNER_SERIAL)' systemd/install.sh $(INSTALL_FLAGS)

uninstall:
	systemd/install.sh --uninstall $(if $(PURGE),--purge)
