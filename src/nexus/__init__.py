"""NEXUS: trainable shared experts for Mixture-of-Experts models.

    import nexus
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("path/to/base")
    nexus.attach_shared_experts(model, init="zero", width_multiplier=1)  # in place
    nexus.save_adapter(model, "adapter/")
    model = nexus.load_model("adapter/")

    # under torchrun, the base sharded over the ranks (FSDP2); every forward goes through `root`
    model, root = nexus.load_sharded_model("adapter/", torch.device("cuda", local_rank))
"""

from .adapter import load_model, load_sharded_model, save_adapter
from .shared import attach_shared_experts
from .version import __version__

__all__ = ["attach_shared_experts", "save_adapter", "load_model", "load_sharded_model", "__version__"]
