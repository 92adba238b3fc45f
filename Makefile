# Quick start: `make demo` and `make test` each create .venv, install requirements.txt and this project (editable),
# then run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test app bench screenshot video clean-venv

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=python3.x)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)  # real HAM10000 test images (samples/README.md; truth in samples/labels.csv)
	$(PY) inference.py --image samples/images/ham10000_malignant_mel_ISIC_0033871.jpg --output runs/demo_result.json
	$(PY) inference.py --folder samples/images --csv runs/demo_predictions.csv

test: $(STAMP)
	$(PY) -m pytest -q

app: $(STAMP)
	$(VENV)/bin/streamlit run streamlit/app.py --server.headless=true --browser.gatherUsageStats=false --client.toolbarMode=viewer

bench: $(STAMP)
	$(PY) scripts/benchmark_inference.py --n 256 --out results/benchmarks/inference.txt

screenshot: $(STAMP)  # the demo with the shipped models in headless chromium -> results/screenshots/demo.png
	MELANOMA_REQUIRE_ALL_TESTS=1 MELANOMA_SCREENSHOT=results/screenshots/demo.png $(PY) -m pytest -q tests/test_browser.py

video: $(STAMP)  # a short clip of the demo with the shipped models in headless chromium -> results/demo/demo.webm (needs ffmpeg)
	MELANOMA_REQUIRE_ALL_TESTS=1 MELANOMA_VIDEO=results/demo/demo.webm $(PY) -m pytest -q tests/test_browser.py -k example

clean-venv:
	rm -rf $(VENV)
