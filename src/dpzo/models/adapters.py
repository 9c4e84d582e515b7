"""Parameter-efficient tuning with the ``peft`` library: what a method trains (``TuningSettings``).

``lora`` injects low-rank adapters into the loaded model in place (``peft.inject_adapter_in_model``):
the model's own weights are frozen, the adapters are its only trainable parameters, so the
zeroth-order flat parameters (``dpzo.zo.flat``) and DP-SGD's per-example gradients hold the
adapters alone.  The adapters start as peft initialises them (B = 0): the tuned model starts
exactly at the pretrained one.

``prefix`` installs ``tokens`` trainable key/value positions in every self-attention layer
(``dpzo.models.prefix``, initialised from the activations of random tokens drawn with the run
seed) and freezes every other weight.
"""

from __future__ import annotations

import torch

from dpzo.methods.hyperparameters import TuningSettings


def apply_tuning(model: torch.nn.Module, tuning: TuningSettings, *, seed: int = 0) -> int:
    """Make ``model`` train what ``tuning`` says; returns the number of trainable parameters.

    ``seed``: the public seed of a prefix's initialising tokens (the run seed)."""
    if tuning.kind == "prefix":
        from dpzo.models.prefix import install_prefix

        prefix = install_prefix(model, tuning.tokens, seed=seed)
        for name, p in model.named_parameters():
            p.requires_grad_(name in prefix)
        model.eval()
    if tuning.kind == "lora":
        import peft

        config = peft.LoraConfig(
            r=tuning.rank,
            lora_alpha=tuning.alpha,
            target_modules=list(tuning.target_modules) if tuning.target_modules else None,
            lora_dropout=0.0,  # zeroth-order training runs the model in eval mode: no dropout
        )
        try:
            peft.inject_adapter_in_model(config, model)
        except ValueError as err:  # no such target modules, or no default for this architecture
            raise ValueError(
                f"tuning: lora cannot adapt {type(model).__name__} ({str(err).splitlines()[0]}); name its "
                "linear layers in tuning.target_modules (e.g. [q_proj, v_proj] or [query, value])"
            ) from None
        model.eval()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
