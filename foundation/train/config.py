"""Validation of a composed training config, before anything heavy is built.

Hydra already refuses ``key=value`` overrides of keys that do not exist. This pass catches
what Hydra lets through — keys added in YAML files or with ``+key=value`` — by checking
every ``_target_`` node against the signature of the class or function it names, and the
top level against the keys of conf/train.yaml. Each error names the key, where it is, and
the closest valid key (difflib).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig

TOP_LEVEL = (
    "seed",
    "ckpt_path",
    "auto_resume",
    "num_threads",
    "test",
    "paths",
    "data",
    "model",
    "task",
    "trainer",
    "strategy",
    "logger",
    "callbacks",
    "hydra",
)
SET_BY_TRAINER = {
    "task": ("model", "basis", "run_config"),
    "strategy": ("accelerator", "gradient_clip_norm"),
    "trainer": ("strategy", "callbacks", "logger", "plugins"),
}
"""Arguments that foundation-train fills in itself: setting them in the config is an error."""


class ConfigError(ValueError):
    """The composed config cannot run; the message names the key and the fix."""


def suggest(key: str, valid: Iterable[str]) -> str:
    valid = sorted(set(valid))
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if match:
        return f"did you mean {match[0]!r}?"
    return f"valid keys: {', '.join(valid)}"


def _target_parameters(target: str) -> tuple[list[str], bool]:
    """(parameter names, accepts any **kwargs) of the callable a ``_target_`` names.

    A class of this package whose ``__init__`` passes ``**kwargs`` on to its base class (a
    task subclassing `HamiltonianModule`) also takes the base's parameters: they are
    collected along the MRO up to an ``__init__`` without ``**kwargs``, and the keys are then
    still checked. Other code's ``**kwargs`` may go anywhere, so it accepts any key."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception as exc:
        raise ConfigError(f"_target_ {target!r} cannot be imported: {exc}") from None
    names: list[str] = []
    for cls in obj.__mro__ if inspect.isclass(obj) else [obj]:
        if names and not cls.__module__.startswith("foundation."):
            return names, True
        fn = cls.__init__ if inspect.isclass(obj) else cls
        params = list(inspect.signature(fn).parameters.values())
        names += [
            p.name
            for p in params
            if p.name != "self"
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in names
        ]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names, False
    return names, True


def check_target_node(
    node: Mapping[str, Any], where: str, set_by_trainer: Iterable[str] = ()
) -> None:
    """Every key of a ``_target_`` node must be a parameter of its target."""
    target = node.get("_target_")
    if target is None:
        return
    names, var_kw = _target_parameters(str(target))
    reserved = set(set_by_trainer)
    for key in node:
        if key.startswith("_"):
            continue
        if key in reserved:
            raise ConfigError(
                f"{where}.{key} is set by foundation-train itself; remove it from the config."
            )
        if key not in names and not var_kw:
            raise ConfigError(
                f"Unknown config key {where}.{key} ({target} has no parameter {key!r}); "
                f"{suggest(key, [n for n in names if n not in reserved])}"
            )


def validate_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` for unknown keys and settings this trainer cannot honour."""
    for key in cfg:
        if key not in TOP_LEVEL:
            raise ConfigError(f"Unknown top-level config key {key!r}; {suggest(key, TOP_LEVEL)}")
    for group in ("data", "task", "trainer", "strategy"):
        node = cfg.get(group)
        if node is None or "_target_" not in node:
            raise ConfigError(
                f"Config group {group!r} is missing or has no _target_; pick one with {group}=<name>."
            )
        check_target_node(node, group, SET_BY_TRAINER.get(group, ()))
    for group in ("logger", "callbacks"):
        for name, node in (cfg.get(group) or {}).items():
            if node is None:
                continue
            if not isinstance(node, DictConfig) or "_target_" not in node:
                raise ConfigError(
                    f"{group}.{name} must be a mapping with a _target_ (or null to disable it)."
                )
            check_target_node(node, f"{group}.{name}")
    from foundation.model.universal import resolve_config

    try:
        resolve_config(cfg.model)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model: {exc}") from None

    trainer = cfg.trainer
    if trainer.get("gradient_clip_val") is not None:
        raise ConfigError(
            "trainer.gradient_clip_val is not used: the module clips gradients itself (manual "
            "optimisation, so non-finite steps can be skipped on every rank); set task.grad_clip_norm."
        )
    if trainer.get("accumulate_grad_batches", 1) != 1:
        raise ConfigError(
            "trainer.accumulate_grad_batches must be 1; raise data.max_edges (the per-rank edge "
            "budget) or the number of ranks for larger effective batches."
        )
    if str(trainer.get("precision")) not in (
        "32",
        "32-true",
        "bf16-mixed",
        "bf16-true",
        "16-mixed",
    ):
        raise ConfigError(
            f"trainer.precision={trainer.get('precision')!r}; use 32-true or bf16-mixed."
        )
    strategy = cfg.strategy
    if (
        strategy.get("name") == "deepspeed"
        and strategy.get("stage") == 3
        and cfg.task.get("ema_decay") is not None
    ):
        raise ConfigError(
            "strategy ZeRO-3 partitions the parameters, which the EMA needs whole on every rank: "
            "set task.ema_decay=null (or use strategy=deepspeed_stage_2)."
        )


PRETRAIN_TASK = "foundation.train.module.HamiltonianModule"


def resolve_overlap_head(cfg: DictConfig, basis: Any) -> str:
    """Apply ``model.overlap_head`` to a pretraining config (in place) and say why.

    ``auto`` (the presets): drop the ``s`` head and the ``s`` loss target when the dataset's
    basis can be integrated exactly (`foundation.physics.overlap.can_integrate`: inference
    then takes S from the basis' tables), keep them otherwise (data read from DeePTB/ABACUS
    folders) or when ``task.band_loss`` needs the DFT S in the batch. ``true`` / ``false``
    keep / drop them. The decision is written back as a boolean, so the run config saved in
    checkpoints says what ran. Fine-tuning tasks take their heads from the checkpoint and
    are left alone.
    """
    from omegaconf import open_dict

    from foundation import keys
    from foundation.physics.overlap import can_integrate

    mode = cfg.model.get("overlap_head", "auto")
    if mode not in ("auto", True, False):
        raise ConfigError(f"model.overlap_head={mode!r}: use auto, true or false.")
    if cfg.task.get("_target_") != PRETRAIN_TASK:
        return "fine-tuning: heads from the checkpoint"
    band_loss = (cfg.task.get("band_loss") or {}).get("weight", 0.0)
    if mode == "auto":
        if band_loss:
            keep, why = True, "task.band_loss needs the DFT S in each batch"
        elif can_integrate(basis):
            keep, why = False, f"basis {basis.name!r} is integrated exactly at inference"
        else:
            keep, why = True, f"basis {basis.name!r} cannot be integrated here"
    else:
        keep, why = bool(mode), f"model.overlap_head={str(mode).lower()}"
    if keep and keys.S not in (cfg.model.get("heads") or {}):
        raise ConfigError(
            f"model.overlap_head keeps the S head ({why}) but model.heads has no 's'; add "
            "model.heads.s='{type: block, scale: 1.0}' and task.targets.s=1.0."
        )
    with open_dict(cfg):
        cfg.model.overlap_head = keep
        if not keep:
            cfg.model.heads.pop(keys.S, None)
            cfg.task.targets.pop(keys.S, None)
    return f"S head {'trained' if keep else 'not trained'}: {why}"
