# The two commands of the README (serve, test). Both set everything up on first use.
.PHONY: serve test setup lock image image-test

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

# The CPU image (deploy/docker/Dockerfile.cpu), built with buildah: no Docker daemon, root.
# Quick when its inputs have not changed (FORCE=1 rebuilds). docs/deploy.md.
IMAGE ?= localhost/unipool-serve:cpu
image:
	IMAGE=$(IMAGE) bash scripts/build-image.sh

# Runs the built image like a user (tests/image): start with no arguments, completions with and
# without a steering profile, /metrics, the health check, SIGTERM. Opt-in: `make test` skips them.
image-test: setup image
	bash scripts/setup-tools.sh
	.venv/bin/python -m pytest tests/image --image $(IMAGE) -v $(ARGS)
