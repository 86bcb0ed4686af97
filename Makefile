# The two commands of the README. Both set up everything they need first (scripts/setup.sh).
.PHONY: run test check eval setup stubs demo

run: setup
	.venv/bin/biogate serve all

test: setup
	.venv/bin/python -m pytest

# The services on their embedded defaults in a temporary data directory, and a scripted story
# through the client SDK (services/demo.py); fails if a step does not behave.
demo: setup
	.venv/bin/python -m services.demo

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
