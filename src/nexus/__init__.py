"""NEXUS: trainable shared experts for Mixture-of-Experts models.

    import nexus
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("path/to/base")
    nexus.attach_shared_experts(model, init="zero", width_multiplier=1)  # in place
    nexus.save_adapter(model, "adapter/")
    model = nexus.load_model("adapter/")
"""

__version__ = "0.1.0"

from .adapter import load_model, save_adapter  # noqa: E402
from .shared import attach_shared_experts  # noqa: E402

__all__ = ["attach_shared_experts", "save_adapter", "load_model", "__version__"]
