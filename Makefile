# The two entry points of the README. Both create .venv and install everything on first use.
.PHONY: demo test setup clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
