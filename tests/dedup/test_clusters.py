"""Union-find, LSH bucketing, verification and the keep rule on small arrays."""
from __future__ import annotations

import numpy as np

from refinery.tasks.dedup.clusters import UnionFind, bucket_edges, choose_winners, jaccard, sort_key, verify_edges


def test_union_find_roots_are_smallest_member():
    uf = UnionFind(10)
    assert uf.union(np.array([9, 3, 5, 7]), np.array([3, 5, 1, 8])) == 4
    r = uf.roots()
    assert r[[9, 3, 5, 1]].tolist() == [1, 1, 1, 1]
    assert r[7] == r[8] == 7 and r[0] == 0
    assert uf.union(np.array([9]), np.array([1])) == 0  # already joined
    # order of the edges does not matter
    uf2 = UnionFind(10)
    uf2.union(np.array([5, 3, 8]), np.array([1, 5, 7]))
    uf2.union(np.array([9]), np.array([3]))
    assert np.array_equal(uf2.roots(), r)


def test_union_find_long_chain():
    n = 5000
    uf = UnionFind(n)
    perm = np.random.default_rng(0).permutation(n - 1)
    uf.union(perm + 1, perm)  # a path 0-1-2-...-(n-1), edges shuffled
    assert (uf.roots() == 0).all()


def test_bucket_edges_star_to_first():
    keys = np.array([5, 0, 7, 5, 0, 5, 7, 9], dtype=np.uint64)
    f, m = bucket_edges(keys)
    assert sorted(zip(f.tolist(), m.tolist())) == [(0, 3), (0, 5), (2, 6)]  # key 0 = no bucket


def test_verify_edges_second_chance():
    sets = {0: np.array([1, 2, 3, 4]), 1: np.array([10, 11, 12, 13]), 2: np.array([10, 11, 12, 13]),
            3: np.array([1, 2, 3, 4])}
    uf = UnionFind(4)
    # bucket [0, 1, 2, 3]: 1 and 2 fail against 0 but match each other; 3 matches 0
    st = verify_edges(np.array([0, 0, 0]), np.array([1, 2, 3]), uf, lambda i: sets[i], 0.8)
    r = uf.roots()
    assert r[3] == r[0] and r[2] == r[1] and r[1] != r[0]
    assert st["verified"] == 2 and st["rejected"] == 1
    assert jaccard(np.array([1, 2, 3]), np.array([2, 3, 4])) == 0.5


def test_keep_rule_order():
    roots = np.array([0, 0, 0, 3, 3])
    date = sort_key([20, 10, 10, None, 5], False)
    quality = sort_key([0.1, 0.2, 0.9, 0.5, 0.5], True)
    ids = sort_key(["e", "d", "c", "b", "a"], False)
    winner, _ = choose_winners(roots, [date, quality, ids])
    # cluster 0: earliest date 10 -> docs 1, 2; highest quality -> doc 2. cluster 3: null date last
    assert winner.tolist() == [2, 2, 2, 4, 4]
