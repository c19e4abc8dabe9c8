"""Checkpoints: atomic writes, run metadata, and the exported inference checkpoint.

* `AtomicCheckpointIO` writes a training checkpoint to a temporary file in the same
  directory, fsyncs it and renames it over the target, so an interrupted write (kill,
  node failure, full disk) leaves the previous ``last.ckpt`` intact.
* `checkpoint_metadata` is what every checkpoint carries under ``"foundation"``: resolved
  config, basis, elements, units and code version.
* `export_inference_checkpoint` writes only tensors and JSON-able values, so the file loads
  with ``torch.load(path, weights_only=True)``; `load_inference_model` rebuilds the model.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

import foundation

INFERENCE_FORMAT = "foundation.inference/1"
UNITS = {"length": "Angstrom", "energy": "eV", "h": "eV", "s": "1"}


@cache
def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one (``+dirty``)."""
    version = foundation.__version__
    src = Path(foundation.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}{'.dirty' if dirty else ''}" if commit else version


def plain(value: Any) -> Any:
    """A JSON-able copy (OmegaConf containers, tuples, numpy scalars → dict/list/str/num)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return json.loads(
        json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    )


def checkpoint_metadata(model: nn.Module, run_config: Mapping | None) -> dict[str, Any]:
    """Resolved config, model config, basis, elements, units, code version (JSON-able)."""
    return {
        "config": plain(run_config) if run_config is not None else None,
        "model_config": plain(model.config),
        "basis": model.basis.to_dict(),
        "elements": list(model.elements),
        "units": dict(UNITS),
        "code_version": code_version(),
    }


def checkpoint_mismatch(
    checkpoint: Mapping[str, Any], module: nn.Module, compare_tensors: bool = True
) -> list[str]:
    """What keeps a training checkpoint from resuming into ``module`` (a HamiltonianModule
    built from the current config): a different basis, head set, or (``compare_tensors``;
    not for ZeRO-3's partitioned parameters) parameter names and shapes. Empty when it
    fits. Each entry says what the checkpoint has and what the run builds."""
    meta = checkpoint.get("foundation") or {}
    model = module.model
    problems = []
    old_basis = meta.get("basis")
    if old_basis is not None and old_basis != model.basis.to_dict():
        old_elements = list(meta.get("elements") or [])
        added = [e for e in model.elements if e not in old_elements]
        removed = [e for e in old_elements if e not in model.elements]
        shells = [
            f"{el}: {old_basis['shells'][el]} → {model.basis.to_dict()['shells'][el]}"
            for el in old_elements
            if el in model.elements
            and old_basis.get("shells", {}).get(el) != model.basis.to_dict()["shells"].get(el)
        ]
        detail = "; ".join(
            part
            for part in (
                f"elements only in the run: {', '.join(added)}" if added else "",
                f"elements only in the checkpoint: {', '.join(removed)}" if removed else "",
                f"shells {', '.join(shells)}" if shells else "",
            )
            if part
        )
        problems.append(
            f"basis {old_basis.get('name')!r} (checkpoint) vs {model.basis.name!r} (run)"
            + (f": {detail}" if detail else "")
        )
    old_heads = list((meta.get("model_config") or {}).get("heads") or [])
    if old_heads and sorted(old_heads) != sorted(model.heads):
        problems.append(f"heads {old_heads} (checkpoint) vs {list(model.heads)} (run)")
    saved = checkpoint.get("state_dict")
    if saved is not None and compare_tensors and not problems:
        from foundation.model.derived import derived_buffer_names

        current = module.state_dict()
        derived = derived_buffer_names(module)  # older files hold them; never loaded
        missing = [k for k in current if k not in saved]
        unexpected = [k for k in saved if k not in current and k not in derived]
        shapes = [
            f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
            for k, v in current.items()
            if k in saved and tuple(saved[k].shape) != tuple(v.shape)
        ]
        for what, names in (
            ("parameters the checkpoint lacks", missing),
            ("parameters only in the checkpoint", unexpected),
            ("parameter shapes differ", shapes),
        ):
            if names:
                more = f" … {len(names) - 3} more" if len(names) > 3 else ""
                problems.append(f"{what}: {', '.join(names[:3])}{more}")
    return problems


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to ``path`` via a temporary sibling + fsync + rename.

    A failed write (full disk, quota, I/O error) raises `OSError` naming ``path`` and
    leaves the previous file in place; temporaries of writers killed earlier (``kill -9``
    leaves ``.<name>.tmp-<pid>``) are removed after a successful write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        _fsync_replace(tmp, path)
    except OSError as exc:
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
        raise OSError(
            exc.errno,
            f"Writing checkpoint {path} failed ({exc.strerror or exc}); {kept}. Free space "
            "on that file system or point the run's output (paths.output_dir) elsewhere.",
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if not _process_alive(stale.name.rsplit("-", 1)[-1]):
            stale.unlink(missing_ok=True)
    return path


def _process_alive(pid: str) -> bool:
    """Whether the process ``pid`` (a string from a file name) still runs on this host."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose local writes are atomic (remote URLs: the default)."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


# ----------------------------------------------------------------------------- inference export
def export_inference_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    run_config: Mapping | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and JSON-able metadata for inference.

    The file holds ``format``, ``state_dict`` (CPU tensors), ``model_config``, ``basis``,
    ``elements``, ``units``, ``code_version``, ``config`` (the training run's resolved config)
    and ``extra``; it loads with ``torch.load(path, weights_only=True)``. Pass the model
    holding the weights to ship (the training module swaps its EMA weights in first).
    """
    payload = checkpoint_metadata(model, run_config) | {
        "format": INFERENCE_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "extra": plain(dict(extra or {})),
    }
    return atomic_torch_save(payload, path)


def load_inference_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The exported dict (tensors + JSON-able values), loaded without unpickling code."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("format") != INFERENCE_FORMAT:
        raise ValueError(
            f"{path}: not an inference checkpoint (format {payload.get('format')!r}, expected "
            f"{INFERENCE_FORMAT!r}); export one with foundation.train.export_inference_checkpoint."
        )
    return payload


def load_inference_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild the `UniversalHamiltonianModel` of an exported checkpoint, in eval mode."""
    from foundation.model import build_model

    payload = load_inference_checkpoint(path)
    model = build_model(payload["model_config"], basis=payload["basis"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()
