"""LoRA (Hu et al. 2021) on the attention projections through peft, merged back into plain weights for export."""

from __future__ import annotations

from torch import nn

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # self- and cross-attention projections (diffusers names)
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP attention projections


def add_lora(module: nn.Module, rank: int, alpha: float | None, targets: list[str]) -> int:
    """Wrap the `targets` Linear layers of `module` with rank-`rank` adapters (in place); only they train.

    Returns the number of trainable parameters. B starts at zero, so the model is unchanged at step 0.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank <= 0:
        raise ValueError(f"--lora-rank must be a positive integer, got {rank}")
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights="gaussian")
    inject_adapter_in_model(config, module)
    count = 0
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
        count += p.numel() if "lora_" in name else 0
    if count == 0:
        raise ValueError(f"LoRA found none of the layers {targets} in {type(module).__name__}")
    return count


def merge_lora(module: nn.Module) -> nn.Module:
    """W <- W + (alpha / r) B A in every adapted layer, and the peft wrappers replaced by the plain layers."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in wrapped:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return module
