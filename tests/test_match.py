"""Exact descriptor matching against brute force (int64/float64) and OpenCV's BFMatcher."""

import numpy as np
import pytest
import torch

import ssld_kernels as sk
from ssld_kernels import reference
from ssld_kernels._backends import _op_status, ext

HAS_CUDA = torch.cuda.is_available()

# (n_queries, n_database, dim)
SHAPES = [(1, 1, 128), (7, 13, 128), (300, 1001, 128), (257, 64, 3), (33, 700, 129)]
KS = [1, 2, 5, 64]


def _backend_params(names=("cpu", "torch", "triton"), cuda_names=("cuda", "triton", "torch")):
    """(backend, device) grid as in tests/_helpers.py::backend_params; GPU ones carry `cuda`."""
    out = []
    status = _op_status("match", "cpu")
    for name in names:
        marks = [] if status[name][0] else [pytest.mark.skip(reason=status[name][1])]
        out.append(pytest.param(name, "cpu", id=f"{name}-cpu", marks=marks))
    cuda_status = _op_status("match", "cuda") if HAS_CUDA else {}
    for name in cuda_names:
        marks = [pytest.mark.cuda]
        if HAS_CUDA and not cuda_status[name][0]:
            marks.append(pytest.mark.skip(reason=cuda_status[name][1]))
        out.append(pytest.param(name, "cuda", id=f"{name}-cuda", marks=marks))
    return out


U32 = 2.0**-24  # float32 unit roundoff


def _float_rtol(dim):
    """Relative error bound of a float32 squared distance sum_d (a_d - b_d)^2 (every backend
    sums the squared differences; no |a|^2 + |b|^2 - 2ab expansion): each difference and
    square rounds once (<= 3u per term, or less with an FMA), and a sum of dim nonnegative
    terms in any order adds <= (dim - 1) u (Higham (4.4)): (dim + 2) u to first order,
    (dim + 3) u with the second-order terms. Relative to the exact distance, so 0 stays 0."""
    return (dim + 3) * U32


def _same_or_near_tie(dist, idx, ref_d, ref_i, q, db):
    """Returned neighbours equal brute force's, except where the true distance of the one
    returned is within rounding (2 x the bound) of brute force's at that rank."""
    true_d = torch.gather(reference.squared_distances(q, db), 1, idx)
    near = (true_d - ref_d.double()).abs() <= 2 * _float_rtol(q.shape[1]) * ref_d.double()
    return torch.all((idx == ref_i) | near)


BACKENDS = _backend_params()
TRITON = _backend_params(("triton",), ("triton",))
# the exact reference for the triton backend: the compiled cpu kernel where it is built
REF_BACKEND = "cpu" if _op_status("match", "cpu")["cpu"][0] else "torch"


def _desc(n, d, dtype, gen, low=0, high=256):
    if dtype == torch.uint8:
        return torch.randint(low, high, (n, d), generator=gen, dtype=torch.uint8)
    return torch.randn(n, d, generator=gen) * 30


def _brute(q, db, k):
    d = reference.squared_distances(q, db).double()
    order = np.lexsort((np.arange(db.shape[0])[None].repeat(q.shape[0], 0), d.numpy()), axis=-1)
    idx = torch.from_numpy(order[:, :k].copy())
    return torch.gather(d, 1, idx).float(), idx


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("nq,ndb,dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
@pytest.mark.parametrize("k", KS)
def test_knn_matches_brute_force(backend, device, nq, ndb, dim, dtype, k):
    if k > ndb:
        pytest.skip("k larger than the database")
    gen = torch.Generator().manual_seed(nq * 7 + ndb + k)
    q, db = _desc(nq, dim, dtype, gen), _desc(ndb, dim, dtype, gen)
    if backend == "triton" and device == "cpu" and dtype == torch.float32:
        # the interpreter runs the float kernel one dimension per step (slow): fewer queries,
        # still several query blocks and database tiles
        q = q[:140]
        nq = q.shape[0]
    dist, idx = sk.match_knn(q.to(device), db.to(device), k, backend=backend)
    assert dist.device.type == device and idx.device.type == device
    dist, idx = dist.cpu(), idx.cpu()
    ref_d, ref_i = _brute(q, db, k)
    assert dist.shape == (nq, k) and idx.dtype == torch.int64 and dist.dtype == torch.float32
    if dtype == torch.uint8:  # integer arithmetic: exact, ties to the lower index
        assert torch.equal(dist, ref_d) and torch.equal(idx, ref_i)
    else:
        exact = torch.gather(reference.squared_distances(q, db), 1, idx)  # of the returned
        torch.testing.assert_close(dist.double(), exact, rtol=_float_rtol(dim), atol=0)
        # indices agree except where two candidates are within rounding of each other
        assert _same_or_near_tie(dist, idx, ref_d, ref_i, q, db)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 4, 10, 20])  # k <= 16: the CPU select-first path
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
def test_ties_go_to_lower_index(backend, device, k, dtype):
    gen = torch.Generator().manual_seed(3 + k)
    db = torch.randint(0, 2, (200, 16), generator=gen, dtype=torch.uint8)  # many exact ties
    db = torch.cat([db, db])  # duplicated rows: equal distances at i and i + 200
    q = torch.randint(0, 2, (50, 16), generator=gen, dtype=torch.uint8)
    q, db = q.to(dtype), db.to(dtype)  # small integers: exact in float32 too
    dist, idx = (t.cpu() for t in sk.match_knn(q.to(device), db.to(device), k, backend=backend))
    ref_d, ref_i = _brute(q, db, k)
    assert torch.equal(dist, ref_d) and torch.equal(idx, ref_i)
    # within equal distances the indices increase
    same = dist[:, 1:] == dist[:, :-1]
    assert torch.all(~same | (idx[:, 1:] > idx[:, :-1]))


@pytest.fixture(scope="module")
def photo_sift():
    """Real SIFT descriptors: astronaut vs a rotated, rescaled copy (many true matches) and
    vs coffee (none)."""
    cv2 = pytest.importorskip("cv2")
    pytest.importorskip("skimage")
    from ssld.dedup.extract import ExtractConfig, describe
    from ssld.photos import load_photo, transform

    cfg = ExtractConfig(max_side=400, max_keypoints=300)
    img = load_photo("astronaut")
    rot, _ = transform(img, "rotate")
    rot = cv2.resize(rot, (300, 300), interpolation=cv2.INTER_AREA)
    _, a = describe(img, cfg)
    _, b = describe(rot, cfg)
    _, c = describe(load_photo("coffee"), cfg)
    return torch.from_numpy(a), torch.from_numpy(np.concatenate([b, c]))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_real_sift_equals_opencv_bfmatcher(backend, device, photo_sift):
    cv2 = pytest.importorskip("cv2")
    q, db = photo_sift
    dist, idx = (t.cpu() for t in sk.match_knn(q.to(device), db.to(device), 2, backend=backend))
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(
        q.numpy().astype(np.float32), db.numpy().astype(np.float32), k=2
    )
    cv_d = torch.tensor([[m.distance for m in ms] for ms in knn], dtype=torch.float64)
    cv_i = torch.tensor([[m.trainIdx for m in ms] for ms in knn])
    # same distances (ours exact integers; OpenCV's float32 sqrt of an exact sum of integers
    # < 2^24, rounded once: u relative), same neighbours
    torch.testing.assert_close(cv_d, dist.double().sqrt(), rtol=U32, atol=0)
    tie = dist[:, 0] == dist[:, 1]
    assert torch.all((idx == cv_i).all(1) | tie)
    ref_d, ref_i = _brute(q, db, 2)
    assert torch.equal(dist, ref_d) and torch.equal(idx, ref_i)
    # and the ratio test keeps the same matches as OpenCV's usual recipe
    ((pairs, _),) = sk.match_pairs([q.to(device)], [db.to(device)], ratio=0.8, backend=backend)
    cv_pairs = {(m.queryIdx, m.trainIdx) for m, n in knn if m.distance < 0.8 * n.distance}
    assert set(map(tuple, pairs.cpu().tolist())) == cv_pairs and len(cv_pairs) > 30


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_knn_equals_opencv_bfmatcher(backend, device):
    cv2 = pytest.importorskip("cv2")
    gen = torch.Generator().manual_seed(5)
    q, db = _desc(120, 128, torch.uint8, gen), _desc(400, 128, torch.uint8, gen)
    dist, idx = (t.cpu() for t in sk.match_knn(q.to(device), db.to(device), 2, backend=backend))
    matches = cv2.BFMatcher(cv2.NORM_L2).knnMatch(
        q.numpy().astype(np.float32), db.numpy().astype(np.float32), k=2
    )
    cv_d = torch.tensor([[m.distance for m in ms] for ms in matches], dtype=torch.float64)
    torch.testing.assert_close(cv_d, dist.double().sqrt(), rtol=U32, atol=0)  # as above
    cv_i = torch.tensor([[m.trainIdx for m in ms] for ms in matches])
    tie = dist[:, 0] == dist[:, 1]
    assert torch.all((idx == cv_i).all(1) | tie)


# the thread count only matters to the CPU-side backends
@pytest.mark.parametrize("backend,device", _backend_params(("cpu", "torch"), ()))
def test_thread_count_does_not_change_results(backend, device):
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


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mutual", [False, True])
def test_match_pairs_ragged(backend, device, mutual):
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
    got = sk.match_pairs(
        [a.to(device) for a in a_list],
        [b.to(device) for b in b_list],
        ratio=0.8,
        mutual=mutual,
        backend=backend,
    )
    assert all(p.device.type == device and d.device.type == device for p, d in got)
    got = [(p.cpu(), d.cpu()) for p, d in got]
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


@pytest.mark.parametrize("backend,device", _backend_params(("cpu", "triton"), ("cuda", "triton")))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
def test_opcheck(backend, device, dtype):
    gen = torch.Generator().manual_seed(1)
    q, db = _desc(9, 32, dtype, gen).to(device), _desc(20, 32, dtype, gen).to(device)
    offs = torch.tensor([0, 4, 9])  # offsets stay on the CPU: the schedule is built there
    doffs = torch.tensor([0, 12, 20])
    torch.library.opcheck(torch.ops.ssld_kernels.match_knn_ragged, (q, db, offs, doffs, 3, backend))


# (queries, database rows) per group: empty groups on either side, fewer database rows than k,
# and groups spanning several query blocks / database tiles.
RAGGED = [(30, 40), (0, 5), (7, 0), (1, 1), (0, 0), (50, 2), (130, 300), (5, 63), (3, 64), (2, 65)]


def _ragged(sizes, dim, dtype, gen, device="cpu", pad=7):
    """Packed (q, db, q_off, db_off); q and db on ``device`` with a row stride of dim + pad."""
    nq, ndb = sum(a for a, _ in sizes), sum(b for _, b in sizes)
    q = _desc(nq, dim + pad, dtype, gen).to(device)[:, :dim]
    db = _desc(ndb, dim + pad, dtype, gen).to(device)[:, :dim]
    q_off = torch.tensor([0, *np.cumsum([a for a, _ in sizes])], dtype=torch.int64)
    db_off = torch.tensor([0, *np.cumsum([b for _, b in sizes])], dtype=torch.int64)
    return q, db, q_off, db_off


def _knn_ragged(q, db, q_off, db_off, k, backend):
    return torch.ops.ssld_kernels.match_knn_ragged(q, db, q_off, db_off, k, backend)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dim", [3, 128, 129])
@pytest.mark.parametrize("k", [1, 2, 5, 64])
def test_triton_equals_cpu_ragged_uint8(backend, device, dim, k):
    gen = torch.Generator().manual_seed(dim * 100 + k)
    q, db, q_off, db_off = _ragged(RAGGED, dim, torch.uint8, gen, device)
    assert q.stride(0) == dim + 7  # rows are not contiguous with each other
    dist, idx = _knn_ragged(q, db, q_off, db_off, k, backend)
    ref_d, ref_i = _knn_ragged(q.cpu(), db.cpu(), q_off, db_off, k, REF_BACKEND)
    assert torch.equal(dist.cpu(), ref_d) and torch.equal(idx.cpu(), ref_i)
    # group 2 has no database: every slot is missing; group 5 has 2 rows
    rows = slice(int(q_off[2]), int(q_off[3]))
    assert torch.all(dist[rows].isinf()) and torch.all(idx[rows] == -1)
    rows = slice(int(q_off[5]), int(q_off[6]))
    assert torch.all(idx[rows, : min(k, 2)] >= 0) and torch.all(idx[rows, 2:] == -1)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("k", [2, 64])
def test_triton_small_blocks(backend, device, k):
    # GPU-sized tiles (16 x 16, K chunks of 32: many tiles, several chunks) in every mode
    from ssld_kernels.triton.match import knn_ragged

    sizes = [(40, 70), (0, 3), (17, 0), (3, 33)]
    gen = torch.Generator().manual_seed(k)
    for dtype in (torch.uint8, torch.float32):
        q, db, q_off, db_off = _ragged(sizes, 70, dtype, gen, device)
        if dtype == torch.float32:  # integer-valued: every summation order is exact
            q, db = q.round(), db.round()
        dist, idx = knn_ragged(q, db, q_off, db_off, k, blocks=(16, 16, 32, 4))
        ref_d, ref_i = _knn_ragged(q.cpu(), db.cpu(), q_off, db_off, k, REF_BACKEND)
        assert torch.equal(dist.cpu(), ref_d) and torch.equal(idx.cpu(), ref_i)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_float_nan_inf_and_ties(backend, device):
    # integer-valued floats: distances are exact in any summation order, so the float path
    # must equal the cpu backend bit for bit, ties, +inf and NaN (after +inf) included
    if REF_BACKEND != "cpu":
        pytest.skip("the NaN order is specified by the cpu kernel, which is not built")
    gen = torch.Generator().manual_seed(4)
    q, db, q_off, db_off = _ragged(RAGGED, 20, torch.uint8, gen)
    q, db = q.float() // 64, db.float() // 64  # few distinct values: many ties
    db[3, 5] = float("inf")  # inf distance to every query
    db[7, 0] = float("inf")
    db[9, 2] = float("nan")  # NaN distance
    q[0, 0] = float("inf")  # inf - inf = NaN against db row 7
    q[20, 1] = float("nan")  # NaN against everything
    dist, idx = _knn_ragged(q.to(device), db.to(device), q_off, db_off, 64, backend)
    ref_d, ref_i = _knn_ragged(q, db, q_off, db_off, 64, REF_BACKEND)
    torch.testing.assert_close(dist.cpu(), ref_d, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx.cpu(), ref_i)
    assert dist.isnan().any() and (dist == float("inf")).any()


def _fma_rounds_once(device) -> bool:
    """Whether Triton's tl.fma rounds once here: always compiled on a GPU; the interpreter
    only from the triton release that added its exact fma (3.6's multiplies, then adds)."""
    if device == "cuda":
        return True
    from triton.runtime import interpreter

    return hasattr(getattr(interpreter, "_interpreter", None), "fma_fp32")


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dim", [1, 130])
def test_triton_float_ragged(backend, device, dim):
    gen = torch.Generator().manual_seed(dim)
    q, db, q_off, db_off = _ragged(RAGGED, dim, torch.float32, gen, device)
    dist, idx = _knn_ragged(q, db, q_off, db_off, 5, backend)
    ref_d, ref_i = _knn_ragged(q.cpu(), db.cpu(), q_off, db_off, 5, REF_BACKEND)
    if REF_BACKEND == "cpu" and ext().cpu_isa() in ("avx2", "avx512") and _fma_rounds_once(device):
        # the same operations (fma per dimension, d ascending) as the FMA cpu variants
        assert torch.equal(dist.cpu(), ref_d) and torch.equal(idx.cpu(), ref_i)
    # per group against brute force in float64 (local indices; missing slots are inf / -1)
    dist, idx = dist.cpu(), idx.cpu()
    for g in range(len(q_off) - 1):
        rq, rdb = slice(int(q_off[g]), int(q_off[g + 1])), slice(int(db_off[g]), int(db_off[g + 1]))
        kk = min(5, rdb.stop - rdb.start)
        assert torch.all(dist[rq, kk:].isinf()) and torch.all(idx[rq, kk:] == -1)
        if kk == 0 or rq.stop == rq.start:
            continue
        gq, gdb = q.cpu()[rq], db.cpu()[rdb]
        ref_d, ref_i = _brute(gq, gdb, kk)
        gd, gi = dist[rq, :kk], idx[rq, :kk]
        exact = torch.gather(reference.squared_distances(gq, gdb), 1, gi)
        torch.testing.assert_close(gd.double(), exact, rtol=_float_rtol(dim), atol=0)
        assert _same_or_near_tie(gd, gi, ref_d, ref_i, gq, gdb)


def test_triton_bad_arguments():
    pytest.importorskip("triton")
    from ssld_kernels.triton.match import knn_ragged

    device = "cuda" if HAS_CUDA else "cpu"
    q = torch.zeros(4, 8, dtype=torch.uint8, device=device)
    off = torch.tensor([0, 4])
    with pytest.raises(TypeError, match="both uint8 or both float32"):
        knn_ragged(q, q.float(), off, off, 2)
    with pytest.raises(ValueError, match="k must be"):
        knn_ragged(q, q, off, off, 65)
    with pytest.raises(ValueError, match="q_off must run from 0 to 4"):
        knn_ragged(q, q, torch.tensor([0, 3]), off, 2)
    with pytest.raises(ValueError, match="nondecreasing"):
        knn_ragged(q, q, torch.tensor([0, 5, 4]), torch.tensor([0, 2, 4]), 2)
    with pytest.raises(ValueError, match="same length"):
        knn_ragged(q, q, off, torch.tensor([0, 2, 4]), 2)
    with pytest.raises(ValueError, match="D <= 33025"):
        wide = torch.zeros(1, 33026, dtype=torch.uint8, device=device)
        knn_ragged(wide, wide, torch.tensor([0, 1]), torch.tensor([0, 1]), 1)
