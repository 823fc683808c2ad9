"""Exact batched descriptor matching: k nearest neighbours and Lowe's ratio test.

Layering as in :mod:`ssld_kernels.divergence`: compiled kernel (``_C.match_knn_cpu``) ->
private ``torch.library.custom_op`` (``ssld_kernels::match_knn_ragged``, with a fake
implementation) -> public functions. The reference is :func:`ssld_kernels.reference.knn`.

The kernel works on *ragged groups*: group g matches queries ``[q_off[g], q_off[g+1])`` of a
packed query matrix against database rows ``[db_off[g], db_off[g+1])`` of a packed database,
so many image pairs with different descriptor counts run in one call with no padding (a
padded row could match itself). Results: exact squared L2 distances (integers for uint8, exact
in float32), ascending, ties to the lower database index, indices local to the group's
database; ``+inf`` / ``-1`` where a group has fewer than k database rows.
"""

import torch
from torch import Tensor

from ssld_kernels import reference
from ssld_kernels._abi import DTYPE_CODES
from ssld_kernels._backends import ext, resolve_backend

__all__ = ["match_knn", "match_pairs"]

MAX_K = 64


def _ext_launch(q, db, q_off, db_off, k, cuda: bool):
    """Fill a KnnParams block and run the compiled kernel (csrc/match.h contract).

    The offsets stay host arrays on both paths (the CUDA host code reads them to build its
    tile schedule); descriptors and outputs live on the descriptors' device, and the CUDA
    kernel is launched on that device's current stream.
    """
    if db.device != q.device:
        raise ValueError(f"queries are on {q.device} but database is on {db.device}")
    nq = q.shape[0]
    dist = torch.empty((nq, k), dtype=torch.float32, device=q.device)
    index = torch.empty((nq, k), dtype=torch.int64, device=q.device)
    if nq == 0:
        return dist, index
    q_off = q_off.to(device="cpu", dtype=torch.int64).contiguous()
    db_off = db_off.to(device="cpu", dtype=torch.int64).contiguous()
    p = ext().KnnParams()
    p.q, p.q_stride, p.nq_total = q.data_ptr(), q.stride(0), nq
    p.db, p.db_stride, p.ndb_total = db.data_ptr(), db.stride(0), db.shape[0]
    p.dtype, p.dim = DTYPE_CODES[q.dtype], q.shape[1]
    p.n_groups, p.q_off, p.db_off = q_off.numel() - 1, q_off.data_ptr(), db_off.data_ptr()
    p.k, p.out_dist, p.out_idx = k, dist.data_ptr(), index.data_ptr()
    if cuda:
        p.device = q.device.index
        p.stream = torch.cuda.current_stream(q.device).cuda_stream
        # schedule + norms in torch's caching allocator (freed in stream order by torch)
        nbytes = ext().match_knn_cuda_workspace_bytes(p)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
        p.workspace, p.workspace_bytes = workspace.data_ptr(), nbytes
        ext().match_knn_cuda(p)
    else:
        p.num_threads = torch.get_num_threads()
        ext().match_knn_cpu(p)
    return dist, index


def _ext_knn_ragged(q, db, q_off, db_off, k):
    return _ext_launch(q, db, q_off, db_off, k, cuda=False)


def _cuda_knn_ragged(q, db, q_off, db_off, k):
    return _ext_launch(q, db, q_off, db_off, k, cuda=True)


def _torch_knn_ragged(q, db, q_off, db_off, k):
    nq = q.shape[0]
    dist = torch.full((nq, k), float("inf"), dtype=torch.float32, device=q.device)
    index = torch.full((nq, k), -1, dtype=torch.int64, device=q.device)
    qo, do = q_off.tolist(), db_off.tolist()
    for g in range(len(qo) - 1):
        qs, dbs = q[qo[g] : qo[g + 1]], db[do[g] : do[g + 1]]
        kk = min(k, dbs.shape[0])
        if qs.shape[0] == 0 or kk == 0:
            continue
        d, i = reference.knn(qs, dbs, kk)
        dist[qo[g] : qo[g + 1], :kk] = d
        index[qo[g] : qo[g + 1], :kk] = i
    return dist, index


@torch.library.custom_op("ssld_kernels::match_knn_ragged", mutates_args=())
def _match_knn_ragged(
    q: Tensor, db: Tensor, q_off: Tensor, db_off: Tensor, k: int, backend: str
) -> tuple[Tensor, Tensor]:
    """Per ragged group k-NN: (dist2 float32 (nq, k), local index int64 (nq, k))."""
    if backend == "cpu":
        return _ext_knn_ragged(q, db, q_off, db_off, k)
    if backend == "cuda":
        return _cuda_knn_ragged(q, db, q_off, db_off, k)
    if backend == "triton":
        from ssld_kernels.triton.match import knn_ragged

        return knn_ragged(q, db, q_off, db_off, k)
    return _torch_knn_ragged(q, db, q_off, db_off, k)


@_match_knn_ragged.register_fake
def _(q, db, q_off, db_off, k, backend):
    nq = q.shape[0]
    return q.new_empty((nq, k), dtype=torch.float32), q.new_empty((nq, k), dtype=torch.int64)


def _check_descriptors(name: str, x, dim: int | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n, D) descriptors, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.uint8, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be uint8 or float32/float16 descriptors, got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"descriptor length mismatch: {name} has D={x.shape[1]}, expected D={dim}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has descriptors of length 0 (shape {tuple(x.shape)})")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    return x


def _common_dtype(*xs: Tensor) -> torch.dtype:
    return torch.uint8 if all(x.dtype == torch.uint8 for x in xs) else torch.float32


def match_knn(
    queries: Tensor, database: Tensor, k: int = 2, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours of each query row in ``database`` by squared L2 distance.

    Args:
        queries: (nq, D) uint8 (SIFT) or float descriptors. database: (ndb, D), same kind.
        k: neighbours per query, 1 <= k <= min(ndb, 64).
    Returns:
        ``(dist2, index)``: float32 and int64 (nq, k), ascending by distance, ties to the lower
        index. For uint8 ``dist2`` is an exact integer (OpenCV BFMatcher NORM_L2 distance
        squared). Memory is O(nq * k) plus tiles: the distance matrix is never stored.
    """
    queries = _check_descriptors("queries", queries)
    database = _check_descriptors("database", database, queries.shape[1])
    if queries.device != database.device:
        raise ValueError(f"queries are on {queries.device} but database is on {database.device}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > MAX_K:
        raise ValueError(f"k must be <= {MAX_K}, got {k}")
    if k > database.shape[0]:
        raise ValueError(f"k={k} is larger than the database ({database.shape[0]} rows)")
    dtype = _common_dtype(queries, database)
    queries, database = queries.to(dtype), database.to(dtype)
    name = resolve_backend(backend, queries.device, (dtype,), op="match")
    offs = torch.tensor([0, queries.shape[0]], dtype=torch.int64)
    doffs = torch.tensor([0, database.shape[0]], dtype=torch.int64)
    return _match_knn_ragged(queries, database, offs, doffs, k, name)


def _pack(name: str, xs, dim: int | None):
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"{name} must be a list of (n_i, D) tensors, got {type(xs).__name__}")
    checked = []
    for i, x in enumerate(xs):
        x = _check_descriptors(f"{name}[{i}]", x, dim)
        dim = x.shape[1]
        checked.append(x)
    return checked, dim


def match_pairs(
    a_list, b_list, *, ratio: float = 0.8, mutual: bool = False, backend: str | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Match many image pairs (a_list[i] vs b_list[i]) in one call with Lowe's ratio test.

    For every descriptor of ``a_list[i]`` the two nearest descriptors of ``b_list[i]`` are
    found exactly; the match is kept when ``best < ratio * second_best`` on distances (not
    squared). A descriptor whose image has fewer than two candidates is not matched. With
    ``mutual=True`` a match (i, j) is also required to be j's nearest neighbour in a.

    Returns one ``(pairs, dist2)`` per image pair: ``pairs`` int64 (m, 2) of
    ``(index in a, index in b)`` and ``dist2`` float32 (m,) squared distances.
    """
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    a_list, dim = _pack("a_list", a_list, None)
    b_list, dim = _pack("b_list", b_list, dim)
    if len(a_list) != len(b_list):
        raise ValueError(
            f"a_list and b_list must have the same length, got {len(a_list)} and {len(b_list)}"
        )
    if not a_list:
        return []
    devices = {x.device for x in a_list + b_list}
    if len(devices) != 1:
        raise ValueError(f"all descriptors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    dtype = _common_dtype(*a_list, *b_list)
    name = resolve_backend(backend, device, (dtype,), op="match")
    a_len = [x.shape[0] for x in a_list]
    b_len = [x.shape[0] for x in b_list]
    a = (
        torch.cat([x.to(dtype) for x in a_list])
        if sum(a_len)
        else a_list[0].new_empty((0, dim), dtype=dtype)
    )
    b = (
        torch.cat([x.to(dtype) for x in b_list])
        if sum(b_len)
        else b_list[0].new_empty((0, dim), dtype=dtype)
    )
    a_off = torch.tensor([0, *_cumsum(a_len)], dtype=torch.int64)
    b_off = torch.tensor([0, *_cumsum(b_len)], dtype=torch.int64)
    dist, index = _match_knn_ragged(a, b, a_off, b_off, 2, name)
    best, second = dist[:, 0].double().sqrt(), dist[:, 1].double().sqrt()
    keep = (index[:, 1] >= 0) & (best < float(ratio) * second)
    group = torch.repeat_interleave(
        torch.arange(len(a_len), device=device), torch.tensor(a_len, device=device)
    )
    local_a = torch.arange(a.shape[0], device=device) - a_off.to(device)[group]
    if mutual:
        _, back_index = _match_knn_ragged(b, a, b_off, a_off, 1, name)
        global_b = (index[:, 0] + b_off.to(device)[group]).clamp(min=0)
        back = back_index[:, 0][global_b] if b.shape[0] else torch.zeros_like(index[:, 0])
        keep = keep & (back == local_a)
    pairs = torch.stack([local_a, index[:, 0]], dim=1)[keep]
    d2 = dist[:, 0][keep]
    counts = torch.bincount(group[keep], minlength=len(a_len)).tolist()
    return list(zip(torch.split(pairs, counts), torch.split(d2, counts)))


def _cumsum(xs):
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out
