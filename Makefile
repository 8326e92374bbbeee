# The two commands of the README: `make demo` and `make test`. Both set everything up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO   ?= demo/gaze
APT    := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || echo sudo apt-get)

.PHONY: demo test venv system clean-demo

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# Debian packages: Fashion-MNIST (real images for the fmnist case study) and Chromium (the report test).
system:
	@if [ ! -f $(FMNIST) ] || ! command -v chromium >/dev/null; then \
	  $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq dataset-fashion-mnist chromium >/dev/null; \
	fi

test: $(STAMP) system
	$(PY) -m pytest -q tests

demo: $(STAMP) system
	@test -f $(DEMO)/DataSets/.complete -a -f $(DEMO)/DNNModels/OriginalModel.pth || \
	  $(PY) -m casestudies gaze -o $(DEMO) --force
	$(PY) HUDD.py -o $(DEMO) -m OriginalModel.pth -mode HUDD -rq True --reps 2

clean-demo:
	rm -rf $(DEMO)
