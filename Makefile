# The book's entry points. `make book` and `make test` are the two commands of the README;
# both create .venv/ with the pinned stack on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: book test outputs benchmark env clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned stack into $(VENV)/ (about two minutes the first time) ..."
	$(BIN)/python -m pip install -qq --disable-pip-version-check -c constraints.txt -e ".[book,test]"
	@touch $(STAMP)

book: $(STAMP)  ## execute every chapter (ci profile) into _build and render _build/html
	$(BIN)/python scripts/build_book.py

test: $(STAMP)  ## unit tests, notebook conventions, nbval over every chapter
	$(BIN)/python -m pytest

outputs: $(STAMP)  ## re-execute the chapters and store their ci outputs in notebooks/
	$(BIN)/python scripts/run_notebooks.py --refresh

benchmark: $(STAMP)  ## time every chapter (ci profile) and write book/runtimes.md
	$(BIN)/python scripts/run_notebooks.py --out _build/benchmark --runtimes book/runtimes.md

clean:
	rm -rf _build
