# The two commands of the README. Both do all the set-up they need first (idempotent).
.PHONY: setup demo test bench clean

setup:
	@bash infra/setup.sh

demo: setup
	.venv/bin/headwater demo

test: setup
	@bash infra/check.sh

bench: setup
	.venv/bin/python benchmarks/serde.py

clean:
	-.venv/bin/headwater down
	rm -rf .headwater
