# The book's entry points. `make book` and `make test` are the two commands of the README;
# both create .venv/ with the pinned stack on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: book test outputs benchmark assignments grade full-edition gpu-smoke browser env clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned stack into $(VENV)/ (about two minutes the first time) ..."
	$(BIN)/python -m pip install -qq --disable-pip-version-check -c constraints.txt -e ".[book,test,otter]"
	@touch $(STAMP)

book: $(STAMP)  ## execute every chapter (ci profile) into _build and render _build/html
	$(BIN)/python scripts/build_book.py

test: $(STAMP) browser  ## unit tests, notebook conventions, nbval over every chapter, assignments, browser, Colab wheel
	$(BIN)/python -m pytest

# The browser test (tests/test_browser.py) needs Debian's chromium and chromedriver. As root with
# apt-get, install them when missing; never fail here: without them the test skips with a reason
# (and fails under CI=true, where a missing browser is a broken setup).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver for the browser test ..."; \
	  (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
	    || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1)) \
	    || echo "could not install chromium; tests/test_browser.py will skip (fail under CI=true)"; \
	else echo "chromium not found and not root with apt-get; tests/test_browser.py will skip (fail under CI=true)"; fi

outputs: $(STAMP)  ## re-execute the chapters and store their ci outputs in notebooks/
	$(BIN)/python scripts/run_notebooks.py --refresh

benchmark: $(STAMP)  ## time every chapter (ci profile) and write book/runtimes.md
	$(BIN)/python scripts/run_notebooks.py --out _build/benchmark --runtimes book/runtimes.md

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

gpu-smoke: $(STAMP)  ## on a GPU: every chapter's full-profile path, cut short (<= 8 min); writes data/results/gpu-smoke.json
	$(BIN)/python scripts/gpu_smoke.py

clean:
	rm -rf _build
