"""Builders of the bundled demo model and of tiny test models: corpus, classifier, evaluation,
tokenizers, random checkpoints. Used by scripts/train_demo_model.py, the tests and the
benchmarks; the server never imports them."""
