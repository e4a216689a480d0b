# The book's entry points. `make book` and `make test` are the two commands of the README;
# both create .venv/ with the pinned stack on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: book test lab pdf outputs benchmark seeds experiments assignments grade full-edition gpu-smoke full-dry browser env clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned stack into $(VENV)/ (about two minutes the first time) ..."
	$(BIN)/python -m pip install -qq --disable-pip-version-check -c constraints.txt -e ".[book,test,otter,lab]"
	@touch $(STAMP)

book: $(STAMP)  ## execute every chapter (ci profile) into _build and render _build/html
	$(BIN)/python scripts/build_book.py

test: $(STAMP) browser  ## unit tests, notebook conventions, nbval over every chapter, assignments, browser, Colab wheel
	$(BIN)/python -m pytest

LAB_ARGS ?=
lab: $(STAMP)  ## JupyterLab on workspace/ (git-ignored copies of the chapters), widget progress bars and live what-ifs; LAB_ARGS="--no-browser --port 8899"
	$(BIN)/python scripts/lab.py $(LAB_ARGS)

pdf: $(STAMP) browser  ## the PDF edition: every page of the site (stored outputs) printed by headless Chromium into _build/pdf/effnb.pdf
	$(BIN)/python scripts/build_pdf.py

# The browser, Lab and PDF tests (tests/test_browser.py, test_lab.py, test_pdf.py) need Debian's chromium and
# chromedriver, and poppler-utils (pdftotext, pdftoppm) for the PDF. As root with
# apt-get, install them when missing; never fail here: without them the test skips with a reason
# (and fails under CI=true, where a missing browser is a broken setup).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v pdftoppm >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium, chromium-driver and poppler-utils for the browser, Lab and PDF tests ..."; \
	  (apt-get install -y -qq chromium chromium-driver poppler-utils >/dev/null 2>&1 \
	    || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver poppler-utils >/dev/null 2>&1)) \
	    || echo "could not install chromium/poppler-utils; the browser, Lab and PDF tests will skip (fail under CI=true)"; \
	else echo "chromium or poppler-utils not found and not root with apt-get; the browser, Lab and PDF tests will skip (fail under CI=true)"; fi

outputs: $(STAMP)  ## re-execute the chapters and store their ci outputs in notebooks/
	$(BIN)/python scripts/run_notebooks.py --refresh

benchmark: $(STAMP)  ## time every chapter (ci profile) and write book/runtimes.md
	$(BIN)/python scripts/run_notebooks.py --out _build/benchmark --runtimes book/runtimes.md

SEEDS ?= 0 10 11 20
NOTEBOOKS ?=
seeds: $(STAMP)  ## every chapter (ci profile) at SEEDS (default "0 10 11 20", the stored sweep; NOTEBOOKS= picks chapters): completion and verdicts into data/results/seed-sweep.json (resumable)
	$(BIN)/python scripts/seed_sweep.py $(NOTEBOOKS) --seeds $(SEEDS)

CHAPTER ?=
DEVICE ?= cpu
experiments: $(STAMP)  ## one chapter's stored scale sweep (CHAPTER=02, 03, 04, 05, 07, 08, 09 or 10; DEVICE=cuda extends it on a GPU): data/results/<chapter>.json, <= 60 min on 2 cores, resumable
	@test -n "$(CHAPTER)" || { echo "usage: make experiments CHAPTER=NN, e.g. make experiments CHAPTER=02"; exit 2; }
	$(BIN)/python scripts/experiments.py --chapter $(CHAPTER) --device $(DEVICE)

FORMAT ?= native
assignments: $(STAMP)  ## student notebooks and autograders of every chapter into _build/assignments (FORMAT=otter: otter-grader's format)
	$(BIN)/python scripts/make_assignments.py --format $(FORMAT)

grade: $(STAMP)  ## grade SUBMISSIONS=folder of student notebooks against CHAPTER=NN (writes folder/grades.csv)
	@test -n "$(SUBMISSIONS)" && test -n "$(CHAPTER)" || { echo "usage: make grade SUBMISSIONS=folder CHAPTER=NN, e.g. make grade SUBMISSIONS=submissions CHAPTER=02"; exit 2; }
	$(BIN)/python scripts/make_assignments.py
	$(BIN)/python scripts/make_assignments.py grade --chapter $(CHAPTER) $(SUBMISSIONS) --out $(SUBMISSIONS)/grades.csv

GPUS ?=
full-edition: $(STAMP)  ## run every chapter with PROFILE=full (needs a GPU; several GPUs run chapters in parallel, GPUS=0,1 picks them) and render _build/full/html
	$(BIN)/python scripts/build_full_edition.py $(if $(GPUS),--gpus $(GPUS))

full-dry: $(STAMP)  ## on the CPU: every chapter's full-profile code path at full size, repetitions cut (EFFNB_SMOKE=dry), into _build/full-dry/
	$(BIN)/python scripts/full_dry.py

gpu-smoke: $(STAMP)  ## on a GPU: every chapter's full-profile path, cut short (<= 8 min); writes data/results/gpu-smoke.json
	$(BIN)/python scripts/gpu_smoke.py

clean:
	rm -rf _build
