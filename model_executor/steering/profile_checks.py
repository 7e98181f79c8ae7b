"""How a steering profile is checked against the model it is loaded for (steering/profile.py
calls these): layers without experts, the routed budget, provenance, and the model's identity."""

from __future__ import annotations

import json

from .contract import BudgetError, effective_budget, parse_budget
from .shape import SteerableModel


class SteeringProfileError(ValueError):
    """A profile that cannot be used; the message names the problem."""


def check_dense_layers(profile) -> None:
    """Layers without experts stay empty: no bias, include or exclude there."""
    profile.dense_layers = tuple(sorted(int(l) for l in profile.dense_layers))
    for layer in profile.dense_layers:
        if not 0 <= layer < profile.num_layers:
            raise SteeringProfileError(
                f"profile {profile.name!r}: dense layer {layer} outside 0..{profile.num_layers - 1}")
        steered = [kind for kind, sets in (("include", profile.include), ("exclude", profile.exclude)) if sets.get(layer)]
        if (profile.bias[layer] != 0).any():
            steered.append("bias")
        if steered:
            raise SteeringProfileError(
                f"profile {profile.name!r}: layer {layer} has no experts (a dense layer of "
                f"{profile.architecture or 'this model'}), but the profile sets {'/'.join(steered)} there: leave that layer empty")


def check_budget(profile) -> None:
    """expert_budget: {"top_k": k'} that the model can run (contract.effective_budget: k' <= its top-k;
    whether it has a shared expert for k' = 0 is checked by check_model, where the model is known);
    no includes when k' is 0."""
    if profile.expert_budget is None:
        return
    what = f"profile {profile.name!r}: expert_budget"
    try:
        k = parse_budget(profile.expert_budget, what)
        effective_budget(None, k, profile.top_k, shared_experts=True)
    except BudgetError as exc:
        raise SteeringProfileError(str(exc) if str(exc).startswith(what) else f"{what}: {exc}") from None
    if k == 0 and profile.include:
        raise SteeringProfileError(f"profile {profile.name!r}: include has no effect with expert_budget.top_k=0 "
                                   "(no routed expert runs): remove it")


def check_provenance(profile) -> None:
    """provenance, when given, is a JSON object (it is stored as JSON text in the file's metadata)."""
    if profile.provenance is None:
        return
    try:
        if not isinstance(profile.provenance, dict):
            raise TypeError(f"a {type(profile.provenance).__name__}")
        json.dumps(profile.provenance, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SteeringProfileError(f"profile {profile.name!r}: provenance must be a JSON object ({exc})") from None


def check_model(profile, config) -> None:
    """The profile was made for this model (config or SteerableModel); SteeringProfileError otherwise."""
    model = SteerableModel.of(config)
    mine = (profile.num_layers, profile.num_experts, profile.top_k)
    theirs = (model.num_layers, model.num_experts, model.top_k)
    kind_differs = bool(profile.router_kind) and profile.router_kind != model.router_kind
    if mine != theirs or profile.config_fingerprint != model.fingerprint or kind_differs:
        made_for = f"{profile.architecture} " if profile.architecture else ""
        raise SteeringProfileError(
            f"profile {profile.name!r} was made for another model: {made_for}(layers, experts, top_k)={mine}, "
            f"router {profile.router_kind or 'unrecorded'}, fingerprint {profile.config_fingerprint}; this model is "
            f"{model.architecture} {theirs}, router {model.router_kind}, fingerprint {model.fingerprint}: "
            f"make the profile again with `unipool-steering create --model <this model's folder>`"
        )
    if profile.dense_layers != model.dense_layers:
        # a file that did not record them (written before they were) is checked against the model's
        steered = [l for l in model.dense_layers if profile.include.get(l) or profile.exclude.get(l)
                   or (profile.bias[l] != 0).any()]
        if steered or profile.router_kind:
            raise SteeringProfileError(
                f"profile {profile.name!r}: dense layers {list(profile.dense_layers)} differ from this model's "
                f"{list(model.dense_layers)}" + (f"; it steers layer(s) {steered}, which have no experts here"
                                                 if steered else ""))
    if profile.expert_budget is not None:
        try:
            effective_budget(None, profile.expert_budget["top_k"], model.top_k, model.shared_experts)
        except BudgetError as exc:
            raise SteeringProfileError(f"profile {profile.name!r} on {model.architecture}: {exc}") from None
