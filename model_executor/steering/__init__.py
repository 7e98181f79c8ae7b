"""Per-request router steering, model-agnostic: any MoE model whose routers read a SteeringTable.

  contract.py  the one contract between the API process and the workers (request fields,
               reserved extra_args, signatures, RPC names, digests, cache salts)
  shape.py     SteerableModel: what a steerable model looks like (layers, experts, top-k,
               router kind, layers without experts), read from any supported config
  families.py  vLLM's own MoE families: where their gates and FusedMoE layers are
  family_hooks.py  steering installed on a loaded vLLM model of those families
  profile.py   the profile file format and its validation
  table.py     the engine's rows and the step's per-token row index
  worker.py    the worker hook that fills the index each step, and the RPCs
  offline.py   the same contract for vLLM's offline `LLM`
  cli.py       `unipool-steering`
"""
