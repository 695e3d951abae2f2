# Two commands: `make book` (execute the notebooks, build the book) and `make test`.
# PROFILE=smoke|cpu|paper picks the profile the notebooks run (default: cpu, the published results).
# FORCE=1 recomputes stored artifacts instead of loading them.

PROFILE ?= cpu
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.hawqlib-installed

.PHONY: book test install clean-book

book: $(STAMP)
	$(BIN)/python -m hawqlib book --profile $(PROFILE)

test: $(STAMP)
	$(BIN)/python -m pytest

install: $(STAMP)

# The virtual environment is created when missing and refreshed when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[book,test]"
	@touch $(STAMP)

clean-book:
	rm -rf book/_build book/executed
