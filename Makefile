# The two entry points of the README (demo, test) and the inner loop (test-fast). All create .venv and install
# everything on first use.
.PHONY: demo test test-fast lint setup clean

PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

# what CI runs: lint and format check, then the whole suite (unit, parity and end-to-end tiers)
test: setup lint
	$(PY) -m pytest -q

# the inner loop: unit and parity tests on tiny configs, no Ray cluster, no servers, no CLI processes
test-fast: setup lint
	$(PY) -m pytest -q -m "not e2e"

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache
