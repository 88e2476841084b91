// RMSNorm over the last dimension with a frozen weight w (length d), one block per row:
//   forward   y = x · inv · w,               inv = 1 / sqrt(mean(x²) + eps)
//   backward  dx = inv · w · g − inv³ · x · mean(w · g · x)
// (the weight is frozen: no dw). The backward recomputes inv from x instead of keeping it.
// Sums are f32 tree reductions over the block; 1/sqrtf, not rsqrtf, to match the CPU op.
#include "common.cuh"

extern "C" __global__ void whet_rmsnorm_fwd_f32(const float* __restrict__ x,
                                                const float* __restrict__ w,
                                                float* __restrict__ y, int d, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * d;
    float* yr = y + (size_t)blockIdx.x * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    const float inv = 1.f / sqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = xr[i] * inv * w[i];
}

extern "C" __global__ void whet_rmsnorm_bwd_f32(const float* __restrict__ x,
                                                const float* __restrict__ w,
                                                const float* __restrict__ g,
                                                float* __restrict__ dx, int d, float eps) {
    __shared__ float scratch[32];
    const size_t off = (size_t)blockIdx.x * d;
    const float *xr = x + off, *gr = g + off;
    float ss = 0.f, dot = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        ss += xr[i] * xr[i];
        dot += xr[i] * gr[i] * w[i];
    }
    ss = block_sum(ss, scratch);
    dot = block_sum(dot, scratch);
    const float inv = 1.f / sqrtf(ss / (float)d + eps);
    const float c = inv * inv * inv * dot / (float)d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dx[off + i] = inv * w[i] * gr[i] - c * xr[i];
}
