"""Exact descriptor matching against brute force (int64/float64) and OpenCV's BFMatcher."""

import numpy as np
import pytest
import torch

import ssld_kernels as sk
from ssld_kernels import reference
from ssld_kernels._backends import _op_status

# (n_queries, n_database, dim)
SHAPES = [(1, 1, 128), (7, 13, 128), (300, 1001, 128), (257, 64, 3), (33, 700, 129)]
KS = [1, 2, 5, 64]


def _backends():
    status = _op_status("match", "cpu")
    return [
        pytest.param(
            name, marks=[] if status[name][0] else [pytest.mark.skip(reason=status[name][1])]
        )
        for name in ("cpu", "torch")
    ]


BACKENDS = _backends()


def _desc(n, d, dtype, gen, low=0, high=256):
    if dtype == torch.uint8:
        return torch.randint(low, high, (n, d), generator=gen, dtype=torch.uint8)
    return torch.randn(n, d, generator=gen) * 30


def _brute(q, db, k):
    d = reference.squared_distances(q, db).double()
    order = np.lexsort((np.arange(db.shape[0])[None].repeat(q.shape[0], 0), d.numpy()), axis=-1)
    idx = torch.from_numpy(order[:, :k].copy())
    return torch.gather(d, 1, idx).float(), idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq,ndb,dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
@pytest.mark.parametrize("k", KS)
def test_knn_matches_brute_force(backend, nq, ndb, dim, dtype, k):
    if k > ndb:
        pytest.skip("k larger than the database")
    gen = torch.Generator().manual_seed(nq * 7 + ndb + k)
    q, db = _desc(nq, dim, dtype, gen), _desc(ndb, dim, dtype, gen)
    dist, idx = sk.match_knn(q, db, k, backend=backend)
    ref_d, ref_i = _brute(q, db, k)
    assert dist.shape == (nq, k) and idx.dtype == torch.int64 and dist.dtype == torch.float32
    if dtype == torch.uint8:  # integer arithmetic: exact, ties to the lower index
        assert torch.equal(dist, ref_d) and torch.equal(idx, ref_i)
    else:
        torch.testing.assert_close(dist, ref_d, rtol=1e-5, atol=1e-3)
        # indices agree except where two candidates are within rounding of each other
        same = idx == ref_i
        near = (
            dist - torch.gather(reference.squared_distances(q, db).float(), 1, idx)
        ).abs() <= 1e-3 * ref_d.clamp(min=1)
        assert torch.all(same | near)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lower_index(backend):
    gen = torch.Generator().manual_seed(3)
    db = torch.randint(0, 2, (200, 16), generator=gen, dtype=torch.uint8)  # many exact ties
    db = torch.cat([db, db])  # duplicated rows: equal distances at i and i + 200
    q = torch.randint(0, 2, (50, 16), generator=gen, dtype=torch.uint8)
    dist, idx = sk.match_knn(q, db, 10, backend=backend)
    ref_d, ref_i = _brute(q, db, 10)
    assert torch.equal(dist, ref_d) and torch.equal(idx, ref_i)
    # within equal distances the indices increase
    same = dist[:, 1:] == dist[:, :-1]
    assert torch.all(~same | (idx[:, 1:] > idx[:, :-1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_equals_opencv_bfmatcher(backend):
    cv2 = pytest.importorskip("cv2")
    gen = torch.Generator().manual_seed(5)
    q, db = _desc(120, 128, torch.uint8, gen), _desc(400, 128, torch.uint8, gen)
    dist, idx = sk.match_knn(q, db, 2, backend=backend)
    matches = cv2.BFMatcher(cv2.NORM_L2).knnMatch(
        q.numpy().astype(np.float32), db.numpy().astype(np.float32), k=2
    )
    cv_d = torch.tensor([[m.distance for m in ms] for ms in matches], dtype=torch.float64)
    torch.testing.assert_close(dist.double().sqrt(), cv_d, rtol=1e-6, atol=1e-3)
    cv_i = torch.tensor([[m.trainIdx for m in ms] for ms in matches])
    tie = dist[:, 0] == dist[:, 1]
    assert torch.all((idx == cv_i).all(1) | tie)


@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_count_does_not_change_results(backend):
    gen = torch.Generator().manual_seed(9)
    q, db = _desc(500, 128, torch.uint8, gen), _desc(3001, 128, torch.uint8, gen)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = sk.match_knn(q, db, 4, backend=backend)
        torch.set_num_threads(2)
        b = sk.match_knn(q, db, 4, backend=backend)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _pairs_oracle(a_list, b_list, ratio, mutual):
    out = []
    for a, b in zip(a_list, b_list):
        if a.shape[0] == 0 or b.shape[0] < 2:
            out.append(set())
            continue
        d, i = _brute(a, b, 2)
        keep = d[:, 0].double().sqrt() < ratio * d[:, 1].double().sqrt()
        found = set()
        for qi in torch.nonzero(keep).flatten().tolist():
            j = i[qi, 0].item()
            if mutual and _brute(b[j : j + 1], a, 1)[1][0, 0].item() != qi:
                continue
            found.add((qi, j))
        out.append(found)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutual", [False, True])
def test_match_pairs_ragged(backend, mutual):
    gen = torch.Generator().manual_seed(11)
    sizes = [(30, 40), (0, 5), (7, 0), (1, 1), (50, 2), (64, 129), (5, 300)]
    a_list, b_list = [], []
    for na, nb in sizes:
        b = _desc(nb, 128, torch.uint8, gen)
        a = _desc(na, 128, torch.uint8, gen)
        if na and nb:  # plant near-copies so the ratio test has matches to keep
            m = min(na, nb)
            a[:m] = (
                (b[:m].int() + torch.randint(-3, 4, (m, 128), generator=gen))
                .clamp(0, 255)
                .to(torch.uint8)
            )
        a_list.append(a)
        b_list.append(b)
    got = sk.match_pairs(a_list, b_list, ratio=0.8, mutual=mutual, backend=backend)
    want = _pairs_oracle(a_list, b_list, 0.8, mutual)
    assert len(got) == len(sizes)
    for (pairs, d2), w, a, b in zip(got, want, a_list, b_list):
        assert set(map(tuple, pairs.tolist())) == w
        if len(pairs):
            ref = reference.squared_distances(a[pairs[:, 0]], b).gather(1, pairs[:, 1:2])[:, 0]
            assert torch.equal(d2, ref.float())
    assert sum(len(p) for p, _ in got) > 50


def test_match_pairs_matches_opencv_ratio_test():
    cv2 = pytest.importorskip("cv2")
    gen = torch.Generator().manual_seed(2)
    b = _desc(200, 128, torch.uint8, gen)
    a = (
        (b[:150].int() + torch.randint(-20, 21, (150, 128), generator=gen))
        .clamp(0, 255)
        .to(torch.uint8)
    )
    ((pairs, _),) = sk.match_pairs([a], [b], ratio=0.75)
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(
        a.numpy().astype(np.float32), b.numpy().astype(np.float32), k=2
    )
    cv_pairs = {(m.queryIdx, m.trainIdx) for m, n in knn if m.distance < 0.75 * n.distance}
    assert set(map(tuple, pairs.tolist())) == cv_pairs


def test_bad_arguments():
    q = torch.zeros(4, 128, dtype=torch.uint8)
    with pytest.raises(ValueError, match="2-D"):
        sk.match_knn(q[0], q)
    with pytest.raises(ValueError, match="mismatch.*D=64.*D=128"):
        sk.match_knn(q, torch.zeros(5, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="int32"):
        sk.match_knn(q.int(), q.int())
    with pytest.raises(ValueError, match="k must be"):
        sk.match_knn(q, q, 0)
    with pytest.raises(ValueError, match="larger than the database"):
        sk.match_knn(q, q[:2], 3)
    with pytest.raises(ValueError, match="same length"):
        sk.match_pairs([q], [q, q])
    with pytest.raises(ValueError, match="ratio"):
        sk.match_pairs([q], [q], ratio=1.5)
    with pytest.raises(TypeError, match="list"):
        sk.match_pairs(q, q)
    with pytest.raises(ValueError, match=r"b_list\[1\]"):
        sk.match_pairs([q, q], [q, torch.zeros(3, 5, dtype=torch.uint8)])
    d, i = sk.match_knn(torch.zeros(0, 128, dtype=torch.uint8), q, 2)
    assert d.shape == (0, 2) and i.shape == (0, 2)
    assert sk.match_pairs([], []) == []


@pytest.mark.parametrize("backend", [b for b in ("cpu",) if _op_status("match", "cpu")[b][0]])
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(1)
    q, db = _desc(9, 32, torch.uint8, gen), _desc(20, 32, torch.uint8, gen)
    offs = torch.tensor([0, 4, 9])
    doffs = torch.tensor([0, 12, 20])
    torch.library.opcheck(torch.ops.ssld_kernels.match_knn_ragged, (q, db, offs, doffs, 3, backend))
