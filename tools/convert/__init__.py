"""Converters from training checkpoints to this project's model folder (docs/checkpoint-format.md).

`unipool-convert megatron` (cli.py) turns a Megatron-LM `--ckpt-format torch` checkpoint of
a UniPool training run into a folder `unipool-serve --model` serves; docs/megatron.md.
"""
