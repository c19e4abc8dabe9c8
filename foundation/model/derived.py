"""Derived constants stay out of checkpoints: they are rebuilt from the config on load.

e3nn keeps constants of the irreps algebra as module buffers — the Wigner-3j blocks of a
compiled tensor product (``_w3j_*`` in its ``torch.fx`` code), output masks, empty weight
placeholders. As ordinary persistent buffers they would be written into every checkpoint and
copied back on load, so a checkpoint from an older code or e3nn version would silently
replace the constants the current code computes. `exclude_derived_buffers` makes the model's
``state_dict`` leave them out and its ``load_state_dict`` ignore them when an older file
still has them: after a load they are always the values this code built.
"""

from __future__ import annotations

import torch
from torch import nn


def _is_derived_owner(module: nn.Module) -> bool:
    """e3nn modules and the fx graph modules e3nn compiles hold only derived constants."""
    return type(module).__module__.startswith("e3nn.") or isinstance(module, torch.fx.GraphModule)


def derived_buffer_names(model: nn.Module) -> set[str]:
    """Qualified names (relative to ``model``) of its derived buffers."""
    return {
        f"{owner}.{name}" if owner else name
        for owner, module in model.named_modules()
        if _is_derived_owner(module)
        for name, _ in module.named_buffers(recurse=False)
    }


def exclude_derived_buffers(model: nn.Module) -> None:
    """Hooks on ``model``: derived buffers are left out of its state_dict (also as part of a
    parent's), dropped from a state_dict being loaded, and not reported missing by a strict
    load. Computed at each call, so heads and adapters added later are covered."""

    def drop_on_save(module, state_dict, prefix, local_metadata):
        for name in derived_buffer_names(module):
            state_dict.pop(prefix + name, None)
        return state_dict

    def drop_on_load(state_dict, prefix, *args):
        for name in derived_buffer_names(model):
            state_dict.pop(prefix + name, None)

    def not_missing(module, incompatible):
        derived = derived_buffer_names(module)
        incompatible.missing_keys[:] = [
            k for k in incompatible.missing_keys if not any(k.endswith(n) for n in derived)
        ]

    model._register_state_dict_hook(drop_on_save)
    model._register_load_state_dict_pre_hook(drop_on_load)
    model.register_load_state_dict_post_hook(not_missing)
