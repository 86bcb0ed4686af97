# The two commands of the README. Both set up everything they need first (scripts/setup.sh).
.PHONY: run test setup stubs

run: setup
	.venv/bin/biogate serve all

test: setup
	.venv/bin/python -m pytest

setup:
	bash scripts/setup.sh

stubs: setup
	.venv/bin/python -m services.common.api.generate
