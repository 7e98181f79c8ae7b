"""Per-request router steering, model-agnostic: any MoE model whose routers read a SteeringTable.

  contract.py  the one contract between the API process and the workers (request fields,
               reserved extra_args, signatures, RPC names, digests, cache salts)
  shape.py     SteerableModel: what a steerable model looks like (layers, experts, top-k,
               router kind, layers without experts), read from any supported config
  families.py  vLLM's own MoE families: where their gates and FusedMoE layers are
  family_hooks.py  steering installed on a loaded vLLM model of those families
  profile.py   the profile file format and its validation
  profile_checks.py  the checks a profile passes against the model it is loaded for
  table.py     the engine's rows and the step's per-token row index
  request_rows.py  one request's rows as the step sees them (per token, with its gate)
  idle_steps.py    a step nobody steers runs a compiled variant that never reads the tables
  probe.py     routing probes: the file format and the score
  probing.py   probes in the engine: scores from the capture buffers after each step
  worker.py    the worker hook that fills the index each step, and the RPCs
  offline.py   the same contract for vLLM's offline `LLM`
(`unipool-steering`, the command line, is tools/steering_cli.py.)
"""
