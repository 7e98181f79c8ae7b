# The two commands of the README. Both set everything up on first use.
.PHONY: serve test setup lock

setup:
	@bash scripts/setup-venv.sh

serve: setup
	.venv/bin/unipool-serve $(ARGS)

test: setup
	bash scripts/setup-tools.sh
	bash scripts/run-tests.sh $(ARGS)

# Re-resolve every dependency (newest versions pyproject.toml allows) into locks/.
lock:
	@bash scripts/lock.sh
