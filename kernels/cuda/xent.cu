// The log-probability of each row's target token, log_softmax(logits)[r, t_r], and its
// gradient, without a (rows, vocab) softmax anywhere: one block per row streams the row once
// keeping a running (max, Σ exp(x − max)) per thread — merged across the block at the end —
// so only the logits chunk the caller already holds is ever resident.
//   forward   lp_r = x[r, t_r] − lse_r,          lse_r = log Σ_j exp(x[r, j])
//   backward  dx[r, j] = g_r · ([j = t_r] − exp(x[r, j] − lse_r))
// The backward recomputes lse_r (one more read of the row) rather than keeping it. A target at
// or past the vocabulary gives NaN (the launch code refuses such targets before launching).
#include "common.cuh"

// Merges the running pair (m, s) with (m2, s2): both sums rescaled to the larger maximum.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == -INFINITY) return;  // both empty
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

// log Σ exp over one row of `vocab` logits; every thread of the block gets the value.
__device__ float row_lse(const float* __restrict__ row, int vocab) {
    __shared__ float sm[32], ss[32];
    float m = -INFINITY, s = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float x = row[j];
        if (x > m) {
            s = s * expf(m - x) + 1.f;
            m = x;
        } else if (x != -INFINITY) {  // −inf logits (masked) add nothing, and avoid inf − inf
            s += expf(x - m);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(WHET_FULL_MASK, m, o);
        const float s2 = __shfl_xor_sync(WHET_FULL_MASK, s, o);
        lse_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = lane < warps ? sm[lane] : -INFINITY;
    s = lane < warps ? ss[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(WHET_FULL_MASK, m, o);
        const float s2 = __shfl_xor_sync(WHET_FULL_MASK, s, o);
        lse_merge(m, s, m2, s2);
    }
    return m + logf(s);
}

extern "C" __global__ void whet_target_logprobs_f32(const float* __restrict__ logits,
                                                    const uint32_t* __restrict__ targets,
                                                    float* __restrict__ out, int vocab) {
    const float* row = logits + (size_t)blockIdx.x * vocab;
    const float lse = row_lse(row, vocab);
    const uint32_t t = targets[blockIdx.x];
    if (threadIdx.x == 0) out[blockIdx.x] = t < (uint32_t)vocab ? row[t] - lse : NAN;
}

extern "C" __global__ void whet_target_logprobs_bwd_f32(const float* __restrict__ logits,
                                                        const uint32_t* __restrict__ targets,
                                                        const float* __restrict__ grad,
                                                        float* __restrict__ dx, int vocab) {
    const size_t off = (size_t)blockIdx.x * vocab;
    const float g = grad[blockIdx.x];
    if (g == 0.f) {  // weight-0 rows (prompts): no exp pass, just zeros
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) dx[off + j] = 0.f;
        return;
    }
    const float lse = row_lse(logits + off, vocab);
    const uint32_t t = targets[blockIdx.x];
    for (int j = threadIdx.x; j < vocab; j += blockDim.x)
        dx[off + j] = (j == (int)t ? g : 0.f) - g * expf(logits[off + j] - lse);
}
