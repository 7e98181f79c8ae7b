"""The pure-PyTorch reference model (transformers-compatible): the numerical ground truth."""
