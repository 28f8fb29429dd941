"""``refinery push PATH --repo ORG/NAME``: a model or dataset folder to a Hugging Face Hub repository.

What goes up: for a training dataset, its complete model folder (``merged/``, ``model/``, the dataset
itself for pretrain) or the model folder named in PATH (``W/finetune/FP/adapter``), as the repository's
root; for any other dataset, the whole dataset as a dataset repository. Every file comes from the
manifest's list after :meth:`Dataset.verify` (sizes and sha256: a damaged file never leaves), and
the ``README.md`` uploaded is the card regenerated now (:func:`refinery.tasks.export.card.card_for`,
with the evaluations found since publishing), not the one frozen in the dataset, which stays as it
was published. One commit through ``huggingface_hub`` (``HfApi.create_commit``, the call
``upload_folder`` makes, given the files one by one so the regenerated card replaces the stored one
without touching the dataset folder).

The token is read from ``HF_TOKEN`` only (never a parameter, never logged); ``HF_ENDPOINT`` names
another hub (a mirror, or the local mock the tests run).
"""
from __future__ import annotations

import os
import posixpath

from refinery.tasks.card import DEFAULT_LICENSE

TOKEN_ENV = "HF_TOKEN"
ENDPOINT_ENV = "HF_ENDPOINT"
MANIFEST = "manifest.json"


class PushError(RuntimeError):
    """Nothing was pushed: no token, a damaged dataset, or PATH is no dataset or model folder."""


def upload_plan(path: str) -> tuple[str, str, list[tuple[str, str]], str]:
    """(repo type, card folder, [(path in repo, local file)], dataset path) of what ``push`` uploads;
    the card (README.md) is not in the list (``push`` writes it)."""
    from refinery.tasks.export.card import CARD, split_model_path, is_model, model_folders
    from refinery.tasks.store import Dataset

    dataset_path, folder = split_model_path(path)
    ds = Dataset.open(dataset_path)
    problems = ds.verify()
    if problems:
        raise PushError(f"{ds.path}: damaged dataset, not pushed: {'; '.join(problems[:3])}")
    m = ds.manifest
    local = ds.local_path()
    files = [f["path"] for f in m.get("files", [])]
    if not is_model(m):
        repo_type, folder = "dataset", "."
    else:
        repo_type = "model"
        folders = dict(model_folders(m))
        if folder is None:
            folder = next((f for f, k in folders.items() if k == "model"), next(iter(folders)))
        if folder not in folders:
            raise PushError(f"{path}: {folder}/ is not a model folder of {ds.path} (its models: "
                            f"{', '.join(f + '/' for f in folders)})")
    prefix = "" if folder == "." else folder.rstrip("/") + "/"
    chosen = [(rel[len(prefix):], os.path.join(local, rel)) for rel in files if rel.startswith(prefix)]
    if folder == ".":
        chosen.append((MANIFEST, os.path.join(local, MANIFEST)))   # the provenance travels with the files
    return repo_type, folder, sorted((r, p) for r, p in chosen if r != CARD), ds.path


def hub_card(card: str, base_model: str | None) -> str:
    """The card as the hub takes it: the hub checks ``base_model`` against its model ids, so a
    relative path (a base that is a local refinery model) becomes ``base_model`` (the hub id the
    user pushed that base to) or leaves the metadata (the card's text still names it)."""
    from huggingface_hub import ModelCard

    parsed = ModelCard(card)
    base = getattr(parsed.data, "base_model", None)
    if base_model is None and not (isinstance(base, str) and base.startswith(".")):
        return card
    parsed.data.base_model = base_model   # type: ignore[attr-defined]  # a ModelCard's data is ModelCardData
    return str(parsed)


def push(path: str, repo: str, *, private: bool = False, revision: str | None = None,
         license: str = DEFAULT_LICENSE, base_model: str | None = None, commit_message: str | None = None) -> dict:
    """Upload the model (or dataset) at ``path`` to ``repo`` in one commit, creating the repository
    (``private`` when asked) and the branch ``revision`` when missing; ``base_model``: the hub id of
    a local base model (see :func:`hub_card`). Returns what was done."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from refinery.tasks.export.card import card_for

    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise PushError(f"set {TOKEN_ENV} to a Hugging Face token with write access (it is read from the "
                        "environment only)")
    repo_type, folder, files, dataset_path = upload_plan(path)
    card = card_for(dataset_path if folder == "." else posixpath.join(dataset_path, folder), license=license)
    if repo_type == "model":
        card = hub_card(card, base_model)
    api = HfApi(endpoint=os.environ.get(ENDPOINT_ENV) or None, token=token)
    api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo, repo_type=repo_type, branch=revision, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=local) for rel, local in files]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    info = api.create_commit(repo_id=repo, repo_type=repo_type, operations=ops, revision=revision,
                             commit_message=commit_message or f"refinery push of {posixpath.basename(dataset_path)}"
                             + ("" if folder == "." else f" ({folder}/)"))
    return {"repo": repo, "repo_type": repo_type, "revision": revision or "main", "files": len(ops),
            "commit": getattr(info, "oid", None), "url": getattr(info, "commit_url", None)}


__all__ = ["push", "hub_card", "upload_plan", "PushError", "TOKEN_ENV", "ENDPOINT_ENV"]
