"""Finding a model's held-out documents through the manifests' lineage.

A model made by the flows is a dataset (pretrain, finetune, align) whose manifest names its inputs
(``inputs``: token datasets) or its starting model (``config.model`` and similar: a dataset path).
Walking up from the model, the first token dataset whose manifest names a ``holdout`` documents
dataset (see refinery.tasks.tokens.stage) gives the documents the model never trained on.
"""
from __future__ import annotations

from collections import deque

from refinery.tasks.modelref import dataset_manifest

MODEL_CONFIG_KEYS = ("model", "policy", "base_model", "reference_model")


def _parents(manifest: dict) -> list[str]:
    out = [i["path"] for i in manifest.get("inputs", []) if isinstance(i, dict) and isinstance(i.get("path"), str)]
    config = manifest.get("config")
    config = config if isinstance(config, dict) else {}
    out += [config[k] for k in MODEL_CONFIG_KEYS if isinstance(config.get(k), str)]
    return out


def heldout_of(model_ref: str, max_depth: int = 12) -> str | None:
    """Path of the held-out documents dataset of ``model_ref``'s training data, or None."""
    seen: set[str] = set()
    queue = deque([(model_ref, 0)])
    while queue:
        path, depth = queue.popleft()
        if path in seen or depth > max_depth:
            continue
        seen.add(path)
        try:
            manifest = dataset_manifest(path)
        except (ValueError, OSError):
            manifest = None
        if manifest is None:
            continue
        hold = manifest.get("holdout")
        if isinstance(hold, dict) and isinstance(hold.get("path"), str):
            return hold["path"]
        queue.extend((p, depth + 1) for p in _parents(manifest))
    return None


__all__ = ["heldout_of"]
