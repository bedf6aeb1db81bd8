"""The exceptions to the general MoE-block mechanism, one explicit table (like PEFT's target-module mappings).

`nexus.moe.find_moe_blocks` finds every MoE block by structure and checks the assumptions NEXUS relies on:
the block is the feed-forward whose input the routed experts receive, the experts work at the block's
input width, the block's output is where the experts' output joins the residual stream, and the
router is found. A family whose layout breaks one of them is served only if this table says how, and
refused by name otherwise. Nothing here is a guess: every entry was read from the family's modeling
code in transformers 5.24 and is exercised by `tests/test_families.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTACH_BLOCK = "block"  # shared expert reads the block's input, its output is added to the block's output
ATTACH_EXPERTS = "experts"  # ... reads the experts module's input, its output is added to the experts' output
ROUTER_LOGITS = "logits"  # router's first output: logits over all experts (softmax gives probabilities)
ROUTER_PROBABILITIES = "probabilities"  # router's first output: already a softmax over all experts


@dataclass(frozen=True)
class FamilyRule:
    """How NEXUS serves one family whose layout the general mechanism cannot take as is."""

    attach: str = ATTACH_BLOCK
    router_returns: str = ROUTER_LOGITS
    router: str | None = None  # the router's child name, when it is not a bare [E, H] weight
    why: str = ""


_GEMMA4 = FamilyRule(
    attach=ATTACH_EXPERTS, router_returns=ROUTER_PROBABILITIES, router="router",
    why="router and experts sit directly in the decoder layer beside a dense MLP: the experts see "
        "pre_feedforward_layernorm_2(residual) and their output goes through post_feedforward_layernorm_2; "
        "the router returns softmax probabilities")

# model_type -> rule. The key is the config's model_type (or its text config's, for a multimodal wrapper).
FAMILY_RULES: dict[str, FamilyRule] = {
    "gemma4": _GEMMA4,
    "gemma4_text": _GEMMA4,
    # Routers whose [E, H] projection sits one level down (or holds extra rows for the family's own
    # shared experts: Inkling's gate scores n_routed + n_shared experts; its first output is routed only).
    "afmoe": FamilyRule(router="router", why="sigmoid router, projection at router.gate"),
    "hunyuan_v1_moe": FamilyRule(router="gate", why="projection at gate.wg"),
    "inkling_text": FamilyRule(router="gate", why="gate weight also scores the family's own shared experts"),
    "nemotron_h": FamilyRule(
        attach=ATTACH_EXPERTS,
        why="latent MoE when moe_latent_size is set: the experts run at the latent width between "
            "fc1_latent_proj and fc2_latent_proj"),
}

# model_type -> why NEXUS refuses it (the general mechanism would find blocks, but serving them needs new math).
REFUSED_FAMILIES: dict[str, str] = {
    "zaya": "its router scores num_experts + 1 classes (a skip expert) and carries router state from layer to "
            "layer, so its routing has no per-layer [T, num_experts] logits for NEXUS to read",
}


def model_types(config) -> list[str]:
    """The config's model_type, then its text config's when that differs (multimodal wrappers)."""
    types = [getattr(config, "model_type", None)]
    get_text = getattr(config, "get_text_config", None)
    if get_text is not None:
        types.append(getattr(get_text(), "model_type", None))
    return [t for i, t in enumerate(types) if t and t not in types[:i]]


def family_rule(config) -> FamilyRule | None:
    """The table's rule for this config's family, or None when the general mechanism applies as is."""
    for t in model_types(config):
        if t in FAMILY_RULES:
            return FAMILY_RULES[t]
    return None


def refusal(config) -> str | None:
    """Why this config's family is refused, or None."""
    for t in model_types(config):
        if t in REFUSED_FAMILIES:
            return REFUSED_FAMILIES[t]
    return None
