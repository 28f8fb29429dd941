"""Candidate pairs from LSH buckets, union-find clustering, verification and the keep rule.

Everything works on global document numbers ``0..N-1`` (earlier-index documents first, then the
new documents in input order) and on numpy arrays, one band at a time:

- :func:`bucket_edges` sorts one band's keys and links every member of a bucket to the bucket's
  first member (the lowest document number): ``k - 1`` edges for a bucket of ``k``;
- :class:`UnionFind` is an array union-find whose ``union`` hooks the larger root under the smaller
  one for a whole array of pairs at once (rounds of vectorized hooking and path halving), so the
  root of a cluster is always its lowest document number, whatever the edge order;
- :func:`verify_edges` keeps the pairs whose exact Jaccard similarity of shingle sets reaches the
  threshold; a bucket member that fails against the first member is compared with the bucket's
  other representatives (up to ``max_reps``), so one unrelated document in a bucket does not hide
  a true pair;
- :func:`choose_winners` orders each cluster's members by the keep rule and picks the first.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


class UnionFind:
    """Disjoint sets over ``0..n-1``; a root is always the smallest member of its set."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: np.ndarray) -> np.ndarray:
        p = self.parent
        r = p[x]
        while True:
            rr = p[r]
            moving = rr != r
            if not moving.any():
                return r
            # path halving for the nodes we walked through
            p[r[moving]] = p[rr[moving]]
            r = rr

    def union(self, u: np.ndarray, v: np.ndarray) -> int:
        """Merge the sets of each pair ``(u[i], v[i])``; returns how many pairs were not yet joined."""
        u = np.asarray(u, dtype=np.int64)
        v = np.asarray(v, dtype=np.int64)
        merged = None
        while len(u):
            ru, rv = self.find(u), self.find(v)
            diff = ru != rv
            if merged is None:
                merged = int(diff.sum())
            if not diff.any():
                break
            ru, rv = ru[diff], rv[diff]
            lo, hi = np.minimum(ru, rv), np.maximum(ru, rv)
            np.minimum.at(self.parent, hi, lo)
            u, v = lo, hi
        return merged or 0

    def roots(self) -> np.ndarray:
        """The root of every element (fully compressed)."""
        p = self.parent
        while True:
            pp = p[p]
            if np.array_equal(pp, p):
                return p
            p = pp
            self.parent = p


class PairUnionFind:
    """Disjoint sets over the documents that appear in some pair, addressed by their global
    numbers: a :class:`UnionFind` over *compact* numbers ``0..m-1`` (the rank of each document
    among ``nodes``, the sorted global numbers seen so far). Memory is ~16 bytes per document in
    a pair (``nodes`` and the parents), whatever the number of documents; a document in no pair
    (a singleton) never enters it.

    Compaction keeps the order of the global numbers, and :class:`UnionFind` hooks the larger
    root under the smaller one, so the root of a set is its smallest global number: the same sets
    and the same roots as a :class:`UnionFind` over all documents given the same pairs.
    """

    def __init__(self) -> None:
        self.nodes = np.zeros(0, dtype=np.int64)
        self.uf = UnionFind(0)

    def __len__(self) -> int:
        return len(self.nodes)

    def add(self, *ids: np.ndarray) -> None:
        """Make sure every document of ``ids`` is a node (a new node is its own set)."""
        new = np.sort(np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])) if ids else self.nodes[:0]
        if len(new):
            new = new[np.concatenate(([True], new[1:] != new[:-1]))]
        if len(self.nodes) and len(new):
            new = new[~_sorted_contains(self.nodes, new)]
        if not len(new):
            return
        at = np.searchsorted(self.nodes, new)   # both sorted and disjoint: a merge, no second sort
        merged = np.insert(self.nodes, at, new)
        pos = np.searchsorted(merged, self.nodes)   # new compact number of every old node
        parent = np.arange(len(merged), dtype=np.int64)
        parent[pos] = pos[self.uf.parent]
        del pos
        self.uf.parent, self.nodes = parent, merged

    def _compact(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.int64)
        c = np.searchsorted(self.nodes, x)
        if len(x) and (c.max() >= len(self.nodes) or not np.array_equal(self.nodes[c], x)):
            raise KeyError("PairUnionFind: a document that was never added")
        return c

    def find(self, x: np.ndarray) -> np.ndarray:
        """The root (smallest global number of the set) of each document of ``x`` (all added)."""
        return self.nodes[self.uf.find(self._compact(x))]

    def union(self, u: np.ndarray, v: np.ndarray) -> int:
        """Add the documents, then merge the sets of each pair; returns how many pairs were not
        yet joined."""
        self.add(u, v)
        return self.uf.union(self._compact(u), self._compact(v))

    def roots(self) -> tuple[np.ndarray, np.ndarray]:
        """``(nodes, root of each node)``, both in global numbers, nodes sorted."""
        return self.nodes, self.nodes[self.uf.roots()]


def _sorted_contains(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Which ``needles`` are in the sorted array ``haystack``."""
    pos = np.searchsorted(haystack, needles)
    pos[pos == len(haystack)] = 0
    return haystack[pos] == needles


def cluster_sizes(roots: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Per node: the size of its set, from the roots (global numbers) of ``PairUnionFind.roots``."""
    if not len(nodes):
        return np.zeros(0, dtype=np.int64)
    c = np.searchsorted(nodes, roots)
    return np.bincount(c, minlength=len(nodes))[c].astype(np.int64)


def bucket_edges(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges ``(first, member)`` linking each bucket member to the bucket's first member.

    ``keys``: uint64 per document, 0 = no key. Sorting is stable, so ``first`` is the lowest
    document number of the bucket and the result does not depend on anything but the keys.
    """
    return bucket_edges_owned([keys])


def bucket_edges_owned(holder: list) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bucket_edges` of ``holder[0]``, which is taken out of ``holder`` so that the key
    array is freed as soon as its sorted copy exists (when the caller holds no other reference):
    peak ~24 bytes per document (keys, sort order, sorted keys), 17 after the sort, plus the
    pairs (``first``, ``member``: 16 bytes each, with ~16 bytes per pair of scratch)."""
    keys = holder.pop()
    n = len(keys)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    del keys
    same = np.zeros(n, dtype=bool)
    np.equal(sk[1:], sk[:-1], out=same[1:])
    same &= sk != 0
    del sk
    members = np.flatnonzero(same)
    if len(members) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    run_start = np.arange(n, dtype=np.int64)
    run_start[same] = 0
    del same
    np.maximum.accumulate(run_start, out=run_start)
    return order[run_start[members]], order[members]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique arrays."""
    if len(a) == 0 or len(b) == 0:
        return 1.0 if len(a) == len(b) else 0.0
    if len(a) > len(b):
        a, b = b, a
    idx = np.searchsorted(b, a)
    idx[idx == len(b)] = 0
    inter = int(np.count_nonzero(b[idx] == a))
    return inter / (len(a) + len(b) - inter)


def verify_edges(first: np.ndarray, member: np.ndarray, uf: UnionFind | PairUnionFind,
                 shingles: Callable[[int], np.ndarray], threshold: float,
                 max_reps: int = 16) -> dict:
    """Union the pairs whose exact Jaccard >= threshold; returns counts.

    Pairs already in one set are skipped (they would not change the clusters). A member that
    fails against its bucket's first member is tried against the bucket's other representatives.
    """
    stats = {"candidates": int(len(first)), "verified": 0, "rejected": 0, "skipped": 0}
    if len(first) == 0:
        return stats
    joined = uf.find(first) == uf.find(member)
    stats["skipped"] = int(joined.sum())
    first, member = first[~joined], member[~joined]
    cache: dict[int, np.ndarray] = {}

    def sh(i: int) -> np.ndarray:
        s = cache.get(i)
        if s is None:
            s = cache[i] = shingles(i)
        return s

    ok = np.zeros(len(first), dtype=bool)
    for k in range(len(first)):
        ok[k] = jaccard(sh(int(first[k])), sh(int(member[k]))) >= threshold
    stats["verified"] += int(ok.sum())
    uf.union(first[ok], member[ok])
    # second chance for the members that failed against the first member of their bucket
    reps: dict[int, list[int]] = {}
    for f, m in zip(first[~ok].tolist(), member[~ok].tolist()):
        rl = reps.setdefault(f, [])
        matched = False
        for r in rl[:max_reps]:
            rr, rm = uf.find(np.array([r, m]))
            if rr == rm:
                matched = True
            elif jaccard(sh(r), sh(m)) >= threshold:
                uf.union(np.array([r]), np.array([m]))
                stats["verified"] += 1
                matched = True
            if matched:
                break
        if not matched:
            stats["rejected"] += 1
            rl.append(m)
    return stats


def sort_key(values: Sequence, descending: bool) -> np.ndarray:
    """A float64 array that sorts ascending in keep-rule order; nulls (None) sort last.

    Numbers (and timestamps given as int64) keep their value; strings are replaced by their rank.
    """
    is_null = np.array([v is None for v in values], dtype=bool)
    present = [v for v in values if v is not None]
    if present and isinstance(present[0], str):
        _, inv = np.unique(np.array([v if v is not None else "" for v in values], dtype=object),
                           return_inverse=True)
        key = inv.astype(np.float64)
    else:
        key = np.array([0.0 if v is None else float(v) for v in values], dtype=np.float64)
    if descending:
        key = -key
    key[is_null] = np.inf
    return key


def choose_winners(roots: np.ndarray, keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """For documents with cluster ``roots`` and per-rule sort keys (earlier keys dominate):
    ``(winner_position_per_doc, order)`` where ``winner_position_per_doc[i]`` is the position (in
    these arrays) of the member of i's cluster that sorts first. Ties end at the document number,
    so the choice is total and deterministic."""
    n = len(roots)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort(tuple([np.arange(n)] + list(reversed(keys)) + [roots]))
    sorted_roots = roots[order]
    start = np.ones(n, dtype=bool)
    start[1:] = sorted_roots[1:] != sorted_roots[:-1]
    first_pos = np.where(start, np.arange(n), 0)
    np.maximum.accumulate(first_pos, out=first_pos)
    winner = np.empty(n, dtype=np.int64)
    winner[order] = order[first_pos]
    return winner, order
