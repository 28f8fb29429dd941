"""Training stages that may run across several nodes (``REFINERY_NNODES`` > 1).

Every node runs the same flow; the stage body launches torchrun into one rendezvous
(:func:`refinery.tasks.train.distributed.launch`). Node 0 builds and publishes the dataset under
the store's writer lock, as any stage does. A node other than node 0 must not wait for that lock
first (node 0 holds it while training, and needs this node's processes to train: a deadlock), so
a :class:`MultiNodeStage` runs its body without the lock there, and once the launcher says this
node's part is done (:class:`~refinery.tasks.train.distributed.FollowerNodeDone`), waits for node
0's dataset. The runtime knows nothing of nodes: this is its ``_without_lock`` hook.

Declare one with ``@stage(NAME, version=..., kind=MultiNodeStage)``.
"""
from __future__ import annotations

import logging
from typing import Any

from refinery.tasks.runtime import Stage, _mark
from refinery.tasks.store import Dataset, Store

log = logging.getLogger("refinery.train")


class MultiNodeStage(Stage):
    """A stage whose body may launch torchrun across nodes (pretrain, finetune, reward, DPO, PPO)."""

    def _without_lock(self, store: Store, inputs: list[Dataset], fp: str, cfg: Any) -> Dataset | None:
        """On a node other than node 0, while node 0 has not published: run this node's part of the
        launch, then wait on the lock for node 0 to publish and return that dataset. Nothing is
        published from here. None elsewhere (the ordinary path: cache, lock, build)."""
        from refinery.tasks.train.distributed import FollowerNodeDone, follower_node

        if not follower_node() or store.get(self.name, fp) is not None:
            return None
        try:
            self._body(store.builder(self.name, fp), inputs, cfg)
        except FollowerNodeDone as done:
            log.info("%s:%s: %s; waiting for node 0 to publish", self.name, fp, done)
        else:
            raise RuntimeError(f"{self.name}: a follower node ran the stage without joining a multi-node launch")
        with store.lock(self.name, fp):   # node 0 publishes under the lock
            found = store.recover(self.name, fp)
        if found is None:
            raise RuntimeError(f"{self.name}:{fp}: this node's part finished but node 0 published no dataset "
                               "(see node 0's log)")
        return _mark(found, cached=True)


__all__ = ["MultiNodeStage"]
