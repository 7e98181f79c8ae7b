"""Per-request steering for vLLM's offline `LLM`, the way the server's enforcement point does it.

    llm = LLM(model=folder, worker_cls="unipool_serve.model_executor.steering.worker.SteeringWorker")
    steering = OfflineSteering(llm)
    steering.add(profile)                          # a SteeringProfile for this model
    params = SamplingParams(..., extra_args=steering.extra_args("safe"))       # budget=1: an expert budget
    llm.generate([{"prompt_token_ids": ids, "cache_salt": steering.cache_salt("safe")}], params)

Offline there is no API key and no client to distrust: whoever holds the `LLM` holds the
secret. The contract is steering/contract.py's, so the workers cannot tell the two apart.
"""

from __future__ import annotations

import secrets

from . import contract
from .probe import RoutingProbe
from .profile import SteeringProfile
from .shape import SteerableModel


class OfflineSteering:
    def __init__(self, llm):
        self.llm = llm
        self.secret = secrets.token_bytes(32)
        llm.collective_rpc(contract.RPC_SET_SECRET, args=(self.secret.hex(),))
        self.model = SteerableModel.of(llm.model_config.hf_config)
        self.rows: dict[str, tuple[int, SteeringProfile]] = {}
        self.probes: dict[str, tuple[int, RoutingProbe]] = {}

    def add(self, profile: SteeringProfile) -> int:
        """Write a profile into the next free row (or its own, when re-added); returns the row."""
        slot = self.rows[profile.name][0] if profile.name in self.rows else len(self.rows) + 1
        self.llm.collective_rpc(contract.RPC_SET_PROFILE, args=contract.set_profile_args(self.secret, slot, profile))
        self.rows[profile.name] = (slot, profile)
        return slot

    def add_probe(self, probe: RoutingProbe) -> int:
        """Write a routing probe into the next free probe row (or its own, when re-added); returns the row."""
        slot = self.probes[probe.name][0] if probe.name in self.probes else len(self.probes) + 1
        self.llm.collective_rpc(contract.RPC_SET_PROBE, args=contract.set_probe_args(self.secret, slot, probe))
        self.probes[probe.name] = (slot, probe)
        return slot

    def _budget(self, name: str | None, budget: int | None) -> int | None:
        """The budget a request runs with, resolved as the enforcement point resolves it."""
        profile_budget = contract.parse_budget(self.rows[name][1].expert_budget) if name is not None else None
        return contract.effective_budget(budget, profile_budget, self.model.top_k, self.model.shared_experts)

    def extra_args(self, name: str | None, budget: int | None = None, capture: int = 0,
                   probes: tuple[str, ...] = (), gate: str | None = None) -> dict | None:
        """SamplingParams.extra_args for profile `name`, an expert budget, routing capture (contract.CAPTURE_*
        flags) and/or probes (names; `gate`: the one whose firing turns the profile on); None when the request
        runs plainly. A probed request must also set SamplingParams(skip_reading_prefix_cache=True), and a
        gated one a cache salt of its own, as the enforcement point does."""
        budget = self._budget(name, budget)
        names = tuple(dict.fromkeys((*probes, *([gate] if gate else []))))
        if name is None and budget is None and not capture and not names:
            return None
        rows = tuple((self.probes[n][0], contract.digest(self.probes[n][1].content_hash())) for n in names)
        gate_row = self.probes[gate][0] if gate else None
        if name is None:
            return contract.steering_args(self.secret, None, 0, "", budget, capture, rows, gate_row)
        slot, profile = self.rows[name]
        return contract.steering_args(self.secret, name, slot, contract.digest(profile.content_hash()), budget,
                                      capture, rows, gate_row)

    def cache_salt(self, name: str | None, user_salt: str | None = None, budget: int | None = None) -> str | None:
        """The prefix-cache salt that keeps this profile's (and budget's) KV blocks apart."""
        budget = self._budget(name, budget)
        if name is None and budget is None:
            return user_salt
        content = "" if name is None else self.rows[name][1].content_hash()
        return contract.cache_salt(self.secret, content, user_salt, budget)
