// Causal grouped-query attention, flash style (FlashAttention-2's recurrences, f32 throughout),
// for packed sequences and for a padded batch behind a KV cache.
//
// What a query sees. Each sequence s has q_len queries and k_len keys; query i sits at key
// position qp = offset + i and sees key j iff  lo ≤ j ≤ qp  and, with a window w > 0,
// qp − j < w. Packed training batches are sequences with offset 0 and lo 0 laid end to end
// (block-diagonal: they never see each other); a padded batch row has offset = the cache
// length and lo = its left padding. Query head h reads key/value head h / (heads / kv_heads).
//
// Layout. Element (s, head, row, c) of q, o, dO, dQ is at
//   seq.q_base + head·q_hs + row·q_rs + c,
// and of k, v, dK, dV at seq.k_base + head·k_hs + row·k_rs + c; so (N, H, D) packed tensors
// (q_rs = H·D, q_hs = D) and (B, H, T, D) batches (q_rs = D, q_hs = T·D) are both read in
// place. lse and delta are (query rows, heads): index (seq.row0 + i)·heads + head.
// A sequence descriptor is 7 int64: q_base, k_base, q_len, k_len, offset, lo, row0.
// A tile is 2 int32: the sequence and its first row (query row for the forward and dQ passes,
// key row for the dK/dV pass); grid = (tiles, heads) or (tiles, kv_heads).
//
// Forward: each warp owns query rows; per tile of keys in shared memory, lane j scores key j
// against the row (q from shared memory, broadcast), the running max / sum are merged with warp
// shuffles, and the probabilities are broadcast lane by lane into the output accumulators
// (each lane owns head elements lane, lane+32, …). The output is normalised at the end and the
// row's log-sum-exp kept for the backward pass (+∞ for a row that sees nothing, so that its
// recomputed probabilities are exp(s − ∞) = 0 and its output 0, as the CPU op gives).
// Backward, with P recomputed from lse (never stored):
//   delta_i = Σ_c dO_ic·O_ic,   dP = dO·Vᵀ,   dS = P ∘ (dP − delta),
//   dQ = scale·dS·K  (a pass over query tiles, like the forward),
//   dK = scale·dSᵀ·Q, dV = Pᵀ·dO  (a pass over key tiles, each summing over its group's heads).
// Two passes instead of atomics: deterministic, at the price of computing the scores twice.
//
// Shared-memory rows that lanes read down a column (lane = row) are padded by one float so the
// 32 lanes hit 32 different banks.
#include "common.cuh"
#include "whet_tiles.h"

#define WHET_ATTN_THREADS (32 * WHET_ATTN_WARPS)

struct Seq {
    long long q_base, k_base, q_len, k_len, offset, lo, row0;
};

__device__ __forceinline__ Seq load_seq(const long long* seqs, int s) {
    const long long* p = seqs + 7 * (size_t)s;
    return Seq{p[0], p[1], p[2], p[3], p[4], p[5], p[6]};
}

// Is key j visible to query i of sequence s?
__device__ __forceinline__ bool visible(const Seq& s, long long i, long long j, int window) {
    const long long qp = s.offset + i;
    return i < s.q_len && j < s.k_len && j >= s.lo && j <= qp && (window <= 0 || qp - j < window);
}

// The keys [first, end) that any of the queries [i0, i1) sees.
__device__ __forceinline__ void key_span(const Seq& s, long long i0, long long i1, int window,
                                         long long& first, long long& end) {
    first = s.lo;
    if (window > 0) first = max(first, s.offset + i0 - window + 1);
    end = min(s.k_len, s.offset + i1);
}

template <int DPL, int BK, int RPW>
__device__ __forceinline__ void attn_fwd(const float* __restrict__ q, const float* __restrict__ k,
                                         const float* __restrict__ v, float* __restrict__ o,
                                         float* __restrict__ lse, const long long* __restrict__ seqs,
                                         const int* __restrict__ tiles, int heads, int kv_heads,
                                         int d, long long q_rs, long long q_hs, long long k_rs,
                                         long long k_hs, int window, float scale) {
    constexpr int DM = 32 * DPL, BQ = WHET_ATTN_WARPS * RPW;
    __shared__ float sk[BK][DM + 1];
    __shared__ float sv[BK][DM];
    __shared__ float sq[BQ][DM];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int h = blockIdx.y, hk = h / (heads / kv_heads);
    const Seq s = load_seq(seqs, tiles[2 * blockIdx.x]);
    const long long i0 = tiles[2 * blockIdx.x + 1], i1 = min(s.q_len, i0 + BQ);
    const float* qh = q + s.q_base + h * q_hs;
    for (int e = threadIdx.x; e < BQ * DM; e += blockDim.x) {
        const int r = e / DM, c = e % DM;
        sq[r][c] = (i0 + r < s.q_len && c < d) ? qh[(i0 + r) * q_rs + c] : 0.f;
    }
    float m[RPW], l[RPW], acc[RPW][DPL];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.f;
#pragma unroll
        for (int c = 0; c < DPL; ++c) acc[r][c] = 0.f;
    }
    long long first, end;
    key_span(s, i0, i1, window, first, end);
    const float* kh = k + s.k_base + hk * k_hs;
    const float* vh = v + s.k_base + hk * k_hs;
    for (long long j0 = first; j0 < end; j0 += BK) {
        __syncthreads();  // the previous tile is consumed (and sq is written, the first time)
        for (int e = threadIdx.x; e < BK * DM; e += blockDim.x) {
            const int r = e / DM, c = e % DM;
            const bool ok = j0 + r < s.k_len && c < d;
            sk[r][c] = ok ? kh[(j0 + r) * k_rs + c] : 0.f;
            sv[r][c] = ok ? vh[(j0 + r) * k_rs + c] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < RPW; ++rr) {
            const int r = warp * RPW + rr;
            const bool vis = lane < BK && visible(s, i0 + r, j0 + lane, window);
            float sc = -INFINITY;
            if (vis) {
                float dot = 0.f;
#pragma unroll 8
                for (int c = 0; c < DM; ++c) dot += sq[r][c] * sk[lane][c];
                sc = dot * scale;
            }
            const float mn = fmaxf(m[rr], warp_max(sc));
            if (mn == -INFINITY) continue;  // warp-uniform: nothing visible yet
            const float p = vis ? expf(sc - mn) : 0.f;
            const float alpha = expf(m[rr] - mn);
            l[rr] = l[rr] * alpha + warp_sum(p);
#pragma unroll
            for (int c = 0; c < DPL; ++c) acc[rr][c] *= alpha;
            for (int jj = 0; jj < BK; ++jj) {
                const float pj = __shfl_sync(WHET_FULL_MASK, p, jj);
#pragma unroll
                for (int c = 0; c < DPL; ++c) acc[rr][c] += pj * sv[jj][lane + 32 * c];
            }
            m[rr] = mn;
        }
    }
    float* oh = o + s.q_base + h * q_hs;
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
        const long long i = i0 + warp * RPW + rr;
        if (i >= s.q_len) continue;
        const float inv = l[rr] > 0.f ? 1.f / l[rr] : 0.f;
#pragma unroll
        for (int c = 0; c < DPL; ++c)
            if (lane + 32 * c < d) oh[i * q_rs + lane + 32 * c] = acc[rr][c] * inv;
        if (lane == 0) lse[(s.row0 + i) * heads + h] = l[rr] > 0.f ? m[rr] + logf(l[rr]) : INFINITY;
    }
}

template <int DPL, int BK, int RPW>
__device__ __forceinline__ void attn_dq(const float* __restrict__ q, const float* __restrict__ k,
                                        const float* __restrict__ v, const float* __restrict__ o,
                                        const float* __restrict__ dout, const float* __restrict__ lse,
                                        float* __restrict__ delta, float* __restrict__ dq,
                                        const long long* __restrict__ seqs,
                                        const int* __restrict__ tiles, int heads, int kv_heads,
                                        int d, long long q_rs, long long q_hs, long long k_rs,
                                        long long k_hs, int window, float scale) {
    constexpr int DM = 32 * DPL, BQ = WHET_ATTN_WARPS * RPW;
    __shared__ float sk[BK][DM + 1];
    __shared__ float sv[BK][DM + 1];
    __shared__ float sq[BQ][DM];
    __shared__ float sdo[BQ][DM];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int h = blockIdx.y, hk = h / (heads / kv_heads);
    const Seq s = load_seq(seqs, tiles[2 * blockIdx.x]);
    const long long i0 = tiles[2 * blockIdx.x + 1], i1 = min(s.q_len, i0 + BQ);
    const size_t qoff = s.q_base + h * q_hs;
    for (int e = threadIdx.x; e < BQ * DM; e += blockDim.x) {
        const int r = e / DM, c = e % DM;
        const bool ok = i0 + r < s.q_len && c < d;
        sq[r][c] = ok ? q[qoff + (i0 + r) * q_rs + c] : 0.f;
        sdo[r][c] = ok ? dout[qoff + (i0 + r) * q_rs + c] : 0.f;
    }
    float dl[RPW], ls[RPW], acc[RPW][DPL];
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
        const long long i = i0 + warp * RPW + rr;
        const bool in = i < s.q_len;
        float part = 0.f;
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            const int col = lane + 32 * c;
            if (in && col < d) part += dout[qoff + i * q_rs + col] * o[qoff + i * q_rs + col];
            acc[rr][c] = 0.f;
        }
        dl[rr] = warp_sum(part);
        ls[rr] = in ? lse[(s.row0 + i) * heads + h] : INFINITY;
        if (in && lane == 0) delta[(s.row0 + i) * heads + h] = dl[rr];
    }
    long long first, end;
    key_span(s, i0, i1, window, first, end);
    const float* kh = k + s.k_base + hk * k_hs;
    const float* vh = v + s.k_base + hk * k_hs;
    for (long long j0 = first; j0 < end; j0 += BK) {
        __syncthreads();
        for (int e = threadIdx.x; e < BK * DM; e += blockDim.x) {
            const int r = e / DM, c = e % DM;
            const bool ok = j0 + r < s.k_len && c < d;
            sk[r][c] = ok ? kh[(j0 + r) * k_rs + c] : 0.f;
            sv[r][c] = ok ? vh[(j0 + r) * k_rs + c] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < RPW; ++rr) {
            const int r = warp * RPW + rr;
            const bool vis = lane < BK && visible(s, i0 + r, j0 + lane, window);
            if (!__any_sync(WHET_FULL_MASK, vis)) continue;
            float ds = 0.f;
            if (vis) {
                float sc = 0.f, dp = 0.f;
#pragma unroll 8
                for (int c = 0; c < DM; ++c) {
                    sc += sq[r][c] * sk[lane][c];
                    dp += sdo[r][c] * sv[lane][c];
                }
                const float p = expf(sc * scale - ls[rr]);
                ds = p * (dp - dl[rr]);
            }
            for (int jj = 0; jj < BK; ++jj) {
                const float dsj = __shfl_sync(WHET_FULL_MASK, ds, jj);
#pragma unroll
                for (int c = 0; c < DPL; ++c) acc[rr][c] += dsj * sk[jj][lane + 32 * c];
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
        const long long i = i0 + warp * RPW + rr;
        if (i >= s.q_len) continue;
#pragma unroll
        for (int c = 0; c < DPL; ++c)
            if (lane + 32 * c < d) dq[qoff + i * q_rs + lane + 32 * c] = acc[rr][c] * scale;
    }
}

template <int DPL, int BQ, int RPW>
__device__ __forceinline__ void attn_dkv(const float* __restrict__ q, const float* __restrict__ k,
                                         const float* __restrict__ v,
                                         const float* __restrict__ dout,
                                         const float* __restrict__ lse,
                                         const float* __restrict__ delta, float* __restrict__ dk,
                                         float* __restrict__ dv, const long long* __restrict__ seqs,
                                         const int* __restrict__ tiles, int heads, int kv_heads,
                                         int d, long long q_rs, long long q_hs, long long k_rs,
                                         long long k_hs, int window, float scale) {
    constexpr int DM = 32 * DPL, BKV = WHET_ATTN_WARPS * RPW;
    __shared__ float sq[BQ][DM + 1];
    __shared__ float sdo[BQ][DM + 1];
    __shared__ float sk[BKV][DM];
    __shared__ float sv[BKV][DM];
    __shared__ float sl[BQ], sdl[BQ];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int hk = blockIdx.y, rep = heads / kv_heads;
    const Seq s = load_seq(seqs, tiles[2 * blockIdx.x]);
    const long long j0 = tiles[2 * blockIdx.x + 1], j1 = min(s.k_len, j0 + BKV);
    const size_t koff = s.k_base + hk * k_hs;
    for (int e = threadIdx.x; e < BKV * DM; e += blockDim.x) {
        const int r = e / DM, c = e % DM;
        const bool ok = j0 + r < j1 && c < d;
        sk[r][c] = ok ? k[koff + (j0 + r) * k_rs + c] : 0.f;
        sv[r][c] = ok ? v[koff + (j0 + r) * k_rs + c] : 0.f;
    }
    float ak[RPW][DPL], av[RPW][DPL];
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr)
#pragma unroll
        for (int c = 0; c < DPL; ++c) ak[rr][c] = av[rr][c] = 0.f;
    // The queries that see any of the keys [j0, j1): qp ≥ j0, and within the window of j1 − 1.
    const long long ilo = max(0LL, j0 - s.offset);
    long long ihi = s.q_len;
    if (window > 0) ihi = min(ihi, j1 - 1 + window - s.offset);
    if (j1 <= s.lo) ihi = ilo;  // every key here is padding: nothing sees it
    for (int hr = 0; hr < rep; ++hr) {
        const int h = hk * rep + hr;
        const size_t qoff = s.q_base + h * q_hs;
        for (long long i0 = ilo; i0 < ihi; i0 += BQ) {
            __syncthreads();
            for (int e = threadIdx.x; e < BQ * DM; e += blockDim.x) {
                const int r = e / DM, c = e % DM;
                const bool ok = i0 + r < s.q_len && c < d;
                sq[r][c] = ok ? q[qoff + (i0 + r) * q_rs + c] : 0.f;
                sdo[r][c] = ok ? dout[qoff + (i0 + r) * q_rs + c] : 0.f;
            }
            for (int r = threadIdx.x; r < BQ; r += blockDim.x) {
                const bool ok = i0 + r < s.q_len;
                sl[r] = ok ? lse[(s.row0 + i0 + r) * heads + h] : INFINITY;
                sdl[r] = ok ? delta[(s.row0 + i0 + r) * heads + h] : 0.f;
            }
            __syncthreads();
#pragma unroll
            for (int rr = 0; rr < RPW; ++rr) {
                const int r = warp * RPW + rr;
                const bool vis = lane < BQ && j0 + r < j1 && visible(s, i0 + lane, j0 + r, window);
                if (!__any_sync(WHET_FULL_MASK, vis)) continue;
                float p = 0.f, ds = 0.f;
                if (vis) {
                    float sc = 0.f, dp = 0.f;
#pragma unroll 8
                    for (int c = 0; c < DM; ++c) {
                        sc += sq[lane][c] * sk[r][c];
                        dp += sdo[lane][c] * sv[r][c];
                    }
                    p = expf(sc * scale - sl[lane]);
                    ds = p * (dp - sdl[lane]);
                }
                for (int x = 0; x < BQ; ++x) {
                    const float px = __shfl_sync(WHET_FULL_MASK, p, x);
                    const float dsx = __shfl_sync(WHET_FULL_MASK, ds, x);
#pragma unroll
                    for (int c = 0; c < DPL; ++c) {
                        av[rr][c] += px * sdo[x][lane + 32 * c];
                        ak[rr][c] += dsx * sq[x][lane + 32 * c];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
        const long long j = j0 + warp * RPW + rr;
        if (j >= j1) continue;
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            const int col = lane + 32 * c;
            if (col < d) {
                dk[koff + j * k_rs + col] = ak[rr][c] * scale;
                dv[koff + j * k_rs + col] = av[rr][c];
            }
        }
    }
}

#define WHET_ATTN_ARGS                                                                       \
    const long long *seqs, const int *tiles, int heads, int kv_heads, int d, long long q_rs, \
        long long q_hs, long long k_rs, long long k_hs, int window, float scale
#define WHET_ATTN_PASS seqs, tiles, heads, kv_heads, d, q_rs, q_hs, k_rs, k_hs, window, scale

#define WHET_ATTN_INSTANCE(D, DPL)                                                              \
    extern "C" __global__ void __launch_bounds__(WHET_ATTN_THREADS)                             \
        whet_attn_fwd_d##D(const float* q, const float* k, const float* v, float* o,           \
                           float* lse, WHET_ATTN_ARGS) {                                        \
        attn_fwd<DPL, WHET_D##D##_FWD_BK, WHET_D##D##_FWD_RPW>(q, k, v, o, lse,                 \
                                                               WHET_ATTN_PASS);                 \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(WHET_ATTN_THREADS)                             \
        whet_attn_dq_d##D(const float* q, const float* k, const float* v, const float* o,      \
                          const float* dout, const float* lse, float* delta, float* dq,         \
                          WHET_ATTN_ARGS) {                                                     \
        attn_dq<DPL, WHET_D##D##_DQ_BK, WHET_D##D##_DQ_RPW>(q, k, v, o, dout, lse, delta, dq,   \
                                                            WHET_ATTN_PASS);                    \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(WHET_ATTN_THREADS)                             \
        whet_attn_dkv_d##D(const float* q, const float* k, const float* v, const float* dout,  \
                           const float* lse, const float* delta, float* dk, float* dv,          \
                           WHET_ATTN_ARGS) {                                                    \
        attn_dkv<DPL, WHET_D##D##_DKV_BQ, WHET_D##D##_DKV_RPW>(q, k, v, dout, lse, delta, dk,   \
                                                               dv, WHET_ATTN_PASS);             \
    }

WHET_ATTN_INSTANCE(64, 2)
WHET_ATTN_INSTANCE(128, 4)
WHET_ATTN_INSTANCE(256, 8)
