"""CUDA backend of exact descriptor matching (csrc/match.cu), GPU only.

uint8 results must be bit-identical to the cpu backend (exact integers, ties to the lower index);
float32 is checked against float64 brute force (and bit for bit against the cpu backend where
that one uses FMA, the same operation sequence).
"""

import pytest
import torch

import ssld_kernels as sk
from ssld_kernels import reference
from ssld_kernels._backends import _op_status, ext

pytestmark = pytest.mark.cuda

# (n_queries, n_database, dim): odd sizes, partial tiles, D not a multiple of 4/16/32, D > 128
SHAPES = [
    (1, 1, 128),
    (7, 13, 128),
    (300, 1001, 128),
    (257, 64, 3),
    (33, 700, 129),
    (130, 257, 32),
    (45, 150, 1000),
]
KS = [1, 2, 5, 64]
DTYPES = [(torch.uint8, 0.0, 0.0), (torch.float32, 1e-3, 1e-5)]  # (dtype, atol, rtol)
# ragged groups (n_queries, n_database): empty groups, groups with fewer than k rows, > 1 tile
GROUPS = [(30, 40), (0, 5), (7, 0), (1, 1), (50, 2), (200, 129), (5, 300), (129, 3), (0, 0)]


@pytest.fixture(autouse=True)
def _need_cuda_backend():
    for device_type, name in (("cuda", "cuda"), ("cpu", "cpu")):  # the cpu backend is the oracle
        ok, why = _op_status("match", device_type)[name]
        if not ok:
            pytest.skip(f"{name} backend: {why}")


def _knn_op(*args):
    return torch.ops.ssld_kernels.match_knn_ragged(*args)


def _desc(n, d, dtype, gen, low=0, high=256):
    if dtype == torch.uint8:
        return torch.randint(low, high, (n, d), generator=gen, dtype=torch.uint8)
    return torch.randn(n, d, generator=gen) * 30


def _cuda(*xs):
    return [x.cuda() for x in xs]


def _assert_same(got, want):
    d, i = (t.cpu() for t in got)
    wd, wi = want
    assert d.dtype == torch.float32 and i.dtype == torch.int64 and d.shape == wd.shape
    assert torch.equal(i, wi), (i != wi).nonzero()[:10]
    torch.testing.assert_close(d, wd, rtol=0, atol=0, equal_nan=True)


def _assert_float_close(q, db, dist, idx, k, atol, rtol):
    """float32 results vs float64 brute force; indices may differ only between near ties."""
    d64 = reference.squared_distances(q.double(), db.double())
    want = torch.sort(d64, dim=1, stable=True)
    kk = min(k, db.shape[0])
    torch.testing.assert_close(dist[:, :kk].double(), want.values[:, :kk], atol=atol, rtol=rtol)
    got_true = torch.gather(d64, 1, idx[:, :kk].clamp(min=0))
    assert torch.all(idx[:, :kk] >= 0)
    assert torch.all((got_true - want.values[:, :kk]).abs() <= atol + rtol * want.values[:, :kk])
    assert torch.all(dist[:, kk:] == float("inf")) and torch.all(idx[:, kk:] == -1)
    assert torch.all(dist[:, 1:] >= dist[:, :-1])


def _check_views(gq, gdb, q, db, dtype, dim, k=5):
    """CUDA k-NN of views ``gq``, ``gdb``: uint8 bit-identical to the CPU kernel on the same
    views ``q``, ``db``; float32 against float64 brute force."""
    got = sk.match_knn(gq, gdb, k, backend="cuda")
    if dtype == torch.uint8:
        _assert_same(got, sk.match_knn(q, db, k, backend="cpu"))
    else:
        d, i = (t.cpu() for t in got)
        _assert_float_close(q, db, d, i, k, atol=1e-3 * dim, rtol=1e-5)


@pytest.mark.parametrize("nq,ndb,dim", SHAPES)
@pytest.mark.parametrize("k", KS)
def test_uint8_bit_identical_to_cpu(nq, ndb, dim, k):
    if k > ndb:
        pytest.skip("k larger than the database")
    gen = torch.Generator().manual_seed(nq * 7 + ndb + k + dim)
    q, db = _desc(nq, dim, torch.uint8, gen), _desc(ndb, dim, torch.uint8, gen)
    want = sk.match_knn(q, db, k, backend="cpu")
    _assert_same(sk.match_knn(*_cuda(q, db), k, backend="cuda"), want)


@pytest.mark.parametrize("dim", [16, 128])
def test_uint8_ties_go_to_lower_index(dim):
    gen = torch.Generator().manual_seed(3)
    db = torch.randint(0, 2, (300, dim), generator=gen, dtype=torch.uint8)
    db = torch.cat([db, db, db[:50]])  # duplicated rows: equal distances across tiles
    q = torch.randint(0, 2, (150, dim), generator=gen, dtype=torch.uint8)
    for k in (1, 10, 64):
        want = sk.match_knn(q, db, k, backend="cpu")
        got = sk.match_knn(*_cuda(q, db), k, backend="cuda")
        _assert_same(got, want)
    # all rows equal: every distance is 0, the k lowest indices win
    same = torch.full((200, dim), 7, dtype=torch.uint8)
    d, i = sk.match_knn(*_cuda(same[:5], same), 64, backend="cuda")
    assert torch.all(d.cpu() == 0) and torch.equal(i.cpu(), torch.arange(64).expand(5, 64))


def test_uint8_extreme_values_largest_dim():
    """dim = 33025: distances up to 33025 * 255^2 = 2147450625 < 2^31, many 128-byte chunks."""
    dim = 33025
    gen = torch.Generator().manual_seed(4)
    q = torch.stack(
        [torch.full((dim,), 255, dtype=torch.uint8), torch.zeros(dim, dtype=torch.uint8)]
    )
    q = torch.cat([q, _desc(3, dim, torch.uint8, gen)])
    db = torch.cat(
        [
            torch.zeros(2, dim, dtype=torch.uint8),
            torch.full((2, dim), 255, dtype=torch.uint8),
            _desc(5, dim, torch.uint8, gen),
        ]
    )
    want = sk.match_knn(q, db, 9, backend="cpu")
    _assert_same(sk.match_knn(*_cuda(q, db), 9, backend="cuda"), want)
    assert want[0][0, -1] == torch.tensor(dim * 255 * 255, dtype=torch.float32)


@pytest.mark.parametrize("nq,ndb,dim", SHAPES)
@pytest.mark.parametrize("k", KS)
def test_float32_matches_float64_brute_force(nq, ndb, dim, k):
    if k > ndb:
        pytest.skip("k larger than the database")
    gen = torch.Generator().manual_seed(nq * 5 + ndb + k + dim)
    q, db = _desc(nq, dim, torch.float32, gen), _desc(ndb, dim, torch.float32, gen)
    dist, idx = (t.cpu() for t in sk.match_knn(*_cuda(q, db), k, backend="cuda"))
    assert dist.shape == (nq, k) and dist.dtype == torch.float32 and idx.dtype == torch.int64
    _assert_float_close(q, db, dist, idx, k, atol=1e-3 * dim, rtol=1e-5)


@pytest.mark.parametrize("nq,ndb,dim", [(300, 1001, 128), (257, 64, 3), (33, 700, 129)])
def test_float32_bit_identical_to_fma_cpu(nq, ndb, dim):
    if ext().cpu_isa() not in ("avx2", "avx512"):
        pytest.skip("the cpu backend's base (SSE2) variant rounds the product separately")
    gen = torch.Generator().manual_seed(nq + ndb + dim)
    q, db = _desc(nq, dim, torch.float32, gen), _desc(ndb, dim, torch.float32, gen)
    want = sk.match_knn(q, db, 5, backend="cpu")
    _assert_same(sk.match_knn(*_cuda(q, db), 5, backend="cuda"), want)


def test_float32_nan_and_inf_order():
    gen = torch.Generator().manual_seed(6)
    q, db = _desc(20, 24, torch.float32, gen), _desc(64, 24, torch.float32, gen)
    db[3, 5] = float("nan")  # NaN distance: after every number, +inf included
    db[10, 0] = float("inf")  # +inf distance
    db[11, 0] = float("inf")
    q[4, 0] = float("inf")  # inf - inf = NaN against rows 10 and 11
    q[7, 2] = float("nan")  # NaN against everything
    want = sk.match_knn(q, db, 64, backend="cpu")
    got = sk.match_knn(*_cuda(q, db), 64, backend="cuda")
    d, i = (t.cpu() for t in got)
    assert torch.equal(i, want[1])
    torch.testing.assert_close(d, want[0], equal_nan=True)
    assert torch.isnan(d[0, -1]) and i[0, -1] == 3 and d[0, -3:-1].isinf().all()
    assert torch.isnan(d[7]).all() and torch.equal(i[7], torch.arange(64))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=str)
@pytest.mark.parametrize("k", KS)
def test_ragged_groups(dtype, atol, rtol, k):
    gen = torch.Generator().manual_seed(11 + k)
    a = [_desc(nq, 128, dtype, gen) for nq, _ in GROUPS]
    b = [_desc(ndb, 128, dtype, gen) for _, ndb in GROUPS]
    q, db = torch.cat(a), torch.cat(b)
    q_off = torch.tensor([0] + [x.shape[0] for x in a]).cumsum(0)
    db_off = torch.tensor([0] + [x.shape[0] for x in b]).cumsum(0)
    dist, idx = (t.cpu() for t in _knn_op(*_cuda(q, db), q_off, db_off, k, "cuda"))
    assert dist.shape == (q.shape[0], k)
    if dtype == torch.uint8:
        _assert_same((dist, idx), _knn_op(q, db, q_off, db_off, k, "cpu"))
        return
    for g, (qa, dba) in enumerate(zip(a, b)):
        rows = slice(int(q_off[g]), int(q_off[g + 1]))
        if qa.shape[0] == 0:
            continue
        if dba.shape[0] == 0:
            assert torch.all(dist[rows] == float("inf")) and torch.all(idx[rows] == -1)
            continue
        _assert_float_close(qa, dba, dist[rows], idx[rows], k, atol=1e-3 * 128, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
def test_many_small_groups(dtype):
    """SIFT dedup shape: many image pairs of a few hundred descriptors each, one launch."""
    gen = torch.Generator().manual_seed(12)
    sizes = torch.randint(0, 400, (300, 2), generator=gen)
    q_off = torch.cat([torch.zeros(1, dtype=torch.int64), sizes[:, 0].cumsum(0)])
    db_off = torch.cat([torch.zeros(1, dtype=torch.int64), sizes[:, 1].cumsum(0)])
    q = _desc(int(q_off[-1]), 128, dtype, gen)
    db = _desc(int(db_off[-1]), 128, dtype, gen)
    got = _knn_op(*_cuda(q, db), q_off, db_off, 2, "cuda")
    want = _knn_op(q, db, q_off, db_off, 2, "cpu")
    if dtype == torch.uint8 or ext().cpu_isa() in ("avx2", "avx512"):
        _assert_same(got, want)
    else:
        torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=0.1)


def test_all_groups_without_database():
    q = torch.randint(0, 256, (40, 128), dtype=torch.uint8)
    db = torch.empty((0, 128), dtype=torch.uint8)
    d, i = _knn_op(*_cuda(q, db), torch.tensor([0, 10, 40]), torch.tensor([0, 0, 0]), 3, "cuda")
    assert torch.all(d.cpu() == float("inf")) and torch.all(i.cpu() == -1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
@pytest.mark.parametrize("offset,dim", [(1, 128), (3, 17), (4, 64)])
def test_unaligned_views(dtype, offset, dim):
    """Row pointers / strides that are not 16-byte aligned take the plain-load path."""
    gen = torch.Generator().manual_seed(offset + dim)
    qb = _desc(150, dim + offset + 1, dtype, gen)
    dbb = _desc(333, dim + offset + 1, dtype, gen)
    q, db = qb[:, offset : offset + dim], dbb[:, offset : offset + dim]
    gq, gdb = qb.cuda()[:, offset : offset + dim], dbb.cuda()[:, offset : offset + dim]
    assert gq.stride(1) == 1
    assert gq.data_ptr() % 16 or gq.stride(0) * gq.element_size() % 16
    _check_views(gq, gdb, q, db, dtype, dim)


@pytest.mark.parametrize("dtype,width,dim", [(torch.uint8, 112, 100), (torch.float32, 8, 5)])
def test_aligned_rows_with_a_partial_last_chunk(dtype, width, dim):
    """16-byte aligned pointers and pitches but a row length that is not a multiple of 16
    bytes: the cp.async path copies a partial chunk (source size strictly between 0 and 16)."""
    gen = torch.Generator().manual_seed(width + dim)
    qb, dbb = _desc(150, width, dtype, gen), _desc(333, width, dtype, gen)
    q, db = qb[:, :dim], dbb[:, :dim]
    gq, gdb = qb.cuda()[:, :dim], dbb.cuda()[:, :dim]
    assert gq.data_ptr() % 16 == 0 and gq.stride(0) * gq.element_size() % 16 == 0
    assert dim * gq.element_size() % 16
    _check_views(gq, gdb, q, db, dtype, dim)


def test_refuses_cuda_graph_capture():
    """The host-built tile schedule cannot be captured: a clear error, not a broken graph."""
    gen = torch.Generator().manual_seed(3)
    gq, gdb = _cuda(_desc(64, 128, torch.uint8, gen), _desc(200, 128, torch.uint8, gen))
    sk.match_knn(gq, gdb, 2, backend="cuda")  # warm up outside the capture
    g = torch.cuda.CUDAGraph()
    with pytest.raises((ValueError, RuntimeError), match="capture"):
        with torch.cuda.graph(g):
            sk.match_knn(gq, gdb, 2, backend="cuda")


def test_non_default_stream():
    """The kernel runs on the caller's current stream: inputs written on that stream are seen."""
    gen = torch.Generator().manual_seed(8)
    q, db = _desc(500, 128, torch.uint8, gen), _desc(3000, 128, torch.uint8, gen)
    want = sk.match_knn(q, db, 4, backend="cpu")
    gq, gdb = _cuda(q, db)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q2 = torch.zeros_like(gq)
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(20_000_000)  # a late producer on s: a kernel on another stream races
        q2.copy_(gq)
        got = sk.match_knn(q2, gdb, 4, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    _assert_same(got, want)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_second_device_and_current_device_kept():
    gen = torch.Generator().manual_seed(9)
    q, db = _desc(100, 128, torch.uint8, gen), _desc(700, 128, torch.uint8, gen)
    want = sk.match_knn(q, db, 3, backend="cpu")
    with torch.cuda.device(0):
        got = sk.match_knn(q.to("cuda:1"), db.to("cuda:1"), 3, backend="cuda")
        assert torch.cuda.current_device() == 0
    assert got[0].device == torch.device("cuda:1")
    _assert_same(got, want)


def test_large_smoke():
    gen = torch.Generator().manual_seed(10)
    q, db = _desc(20000, 128, torch.uint8, gen), _desc(50000, 128, torch.uint8, gen)
    dist, idx = sk.match_knn(*_cuda(q, db), 2, backend="cuda")
    torch.cuda.synchronize()
    assert dist.shape == (20000, 2) and torch.all(idx >= 0) and torch.all(idx < 50000)
    rows = torch.randperm(20000, generator=gen)[:300]
    want = sk.match_knn(q[rows], db, 2, backend="cpu")
    _assert_same((dist[rows.cuda()], idx[rows.cuda()]), want)


def test_match_pairs_same_as_cpu():
    gen = torch.Generator().manual_seed(13)
    a_list = [_desc(n, 128, torch.uint8, gen) for n in (30, 0, 7, 1, 50, 64, 5)]
    b_list = [_desc(n, 128, torch.uint8, gen) for n in (40, 5, 0, 1, 2, 129, 300)]
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        m = min(a.shape[0], b.shape[0])
        a[:m] = (b[:m].int() + torch.randint(-3, 4, (m, 128), generator=gen)).clamp(0, 255).byte()
        a_list[i] = a
    for mutual in (False, True):
        want = sk.match_pairs(a_list, b_list, mutual=mutual, backend="cpu")
        got = sk.match_pairs(_cuda(*a_list), _cuda(*b_list), mutual=mutual, backend="cuda")
        assert len(got) == len(want)
        for (gp, gd), (wp, wd) in zip(got, want):
            assert torch.equal(gp.cpu(), wp) and torch.equal(gd.cpu(), wd)


def test_bad_arguments_raise():
    q = torch.zeros(4, 16, dtype=torch.uint8, device="cuda")
    offs = torch.tensor([0, 4])
    with pytest.raises(ValueError, match="k must be"):
        _knn_op(q, q, offs, offs, 65, "cuda")
    with pytest.raises(ValueError, match="nondecreasing"):
        _knn_op(q, q, torch.tensor([0, 3, 2, 4]), torch.tensor([0, 1, 2, 4]), 1, "cuda")
    with pytest.raises(ValueError, match="nq_total"):
        _knn_op(q, q, torch.tensor([0, 3]), offs, 1, "cuda")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
def test_opcheck(dtype):
    gen = torch.Generator().manual_seed(1)
    q, db = _cuda(_desc(9, 32, dtype, gen), _desc(20, 32, dtype, gen))
    offs = torch.tensor([0, 4, 9])
    doffs = torch.tensor([0, 12, 20])
    torch.library.opcheck(torch.ops.ssld_kernels.match_knn_ragged, (q, db, offs, doffs, 3, "cuda"))


def test_workspace_from_torch_and_own_fallback():
    """match.py passes a workspace from torch's caching allocator (sized by
    match_knn_cuda_workspace_bytes); without one the kernel allocates its own; a too small
    one is refused. All three give the cpu result."""
    g = torch.Generator().manual_seed(5)
    q = torch.randint(0, 256, (300, 128), dtype=torch.uint8, generator=g)
    db = torch.randint(0, 256, (900, 128), dtype=torch.uint8, generator=g)
    want = sk.match_knn(q, db, k=2, backend="cpu")
    got = sk.match_knn(q.cuda(), db.cuda(), k=2, backend="cuda")
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))

    def params(qc, dbc, dist, idx):
        p = ext().KnnParams()
        p.q, p.q_stride, p.nq_total = qc.data_ptr(), qc.stride(0), qc.shape[0]
        p.db, p.db_stride, p.ndb_total = dbc.data_ptr(), dbc.stride(0), dbc.shape[0]
        p.dtype, p.dim, p.k = 4, 128, 2
        off_q = torch.tensor([0, qc.shape[0]], dtype=torch.int64)
        off_db = torch.tensor([0, dbc.shape[0]], dtype=torch.int64)
        p.n_groups, p.q_off, p.db_off = 1, off_q.data_ptr(), off_db.data_ptr()
        p.out_dist, p.out_idx = dist.data_ptr(), idx.data_ptr()
        p.device = qc.device.index
        p.stream = torch.cuda.current_stream().cuda_stream
        return p, (off_q, off_db)

    qc, dbc = q.cuda(), db.cuda()
    dist = torch.empty((300, 2), dtype=torch.float32, device="cuda")
    idx = torch.empty((300, 2), dtype=torch.int64, device="cuda")
    p, keep = params(qc, dbc, dist, idx)
    need = ext().match_knn_cuda_workspace_bytes(p)
    assert need >= 300 * 4 + 900 * 4  # the uint8 row norms live there too
    ext().match_knn_cuda(p)  # no workspace: its own (cudaMallocAsync)
    torch.cuda.synchronize()
    assert torch.equal(dist.cpu(), want[0]) and torch.equal(idx.cpu(), want[1])
    small = torch.empty(need - 1, dtype=torch.uint8, device="cuda")
    p.workspace, p.workspace_bytes = small.data_ptr(), need - 1
    with pytest.raises(ValueError, match="needed"):
        ext().match_knn_cuda(p)
    big = torch.empty(need + 512, dtype=torch.uint8, device="cuda")
    p.workspace, p.workspace_bytes = big.data_ptr() + 8, need  # int64 tiles need alignment
    with pytest.raises(ValueError, match="aligned"):
        ext().match_knn_cuda(p)
    p.workspace = big.data_ptr()  # a torch allocation: aligned
    ext().match_knn_cuda(p)
    torch.cuda.synchronize()
    assert torch.equal(dist.cpu(), want[0]) and torch.equal(idx.cpu(), want[1])
