# The two commands of the README. Both set up everything they need first (scripts/setup.sh).
.PHONY: run test check eval setup stubs

run: setup
	.venv/bin/biogate serve all

test: setup
	.venv/bin/python -m pytest

# The edit loop: no models, no evaluation runs, no fuzzing or attack suites (tiers: pyproject markers).
check: setup
	.venv/bin/python -m pytest -q -m "not models and not eval and not fuzz and not attacks"

# Evaluation-grade tests alone (CI runs them within `make test`).
eval: setup
	.venv/bin/python -m pytest -q -m eval

setup:
	bash scripts/setup.sh

stubs: setup
	.venv/bin/python -m services.common.api.generate
