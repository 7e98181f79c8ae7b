"""Offline tools: what runs before or beside serving, never inside an engine.

  convert/          `unipool-convert`: Megatron-LM checkpoints to model folders, pruned pools
  fit/              `unipool-steering fit`: profiles fitted from labelled examples
  usage.py          how much each pool expert is used (a server's counts, or a calibration run)
  steering_cli.py   `unipool-steering`: create, show, subpool and fit profile files
"""
