// SwiGLU, y = silu(g) · u = g · σ(g) · u, elementwise; backward
//   dg = dy · u · σ(g) · (1 + g · (1 − σ(g))),   du = dy · g · σ(g).
// σ uses expf (not __expf) so values match the CPU op within a few ulp.
#include "common.cuh"

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

extern "C" __global__ void whet_swiglu_fwd_f32(const float* __restrict__ g,
                                               const float* __restrict__ u,
                                               float* __restrict__ y, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float gi = g[i];
        y[i] = gi * sigmoidf(gi) * u[i];
    }
}

extern "C" __global__ void whet_swiglu_bwd_f32(const float* __restrict__ g,
                                               const float* __restrict__ u,
                                               const float* __restrict__ dy,
                                               float* __restrict__ dg, float* __restrict__ du,
                                               size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float gi = g[i], s = sigmoidf(gi);
        dg[i] = dy[i] * u[i] * s * (1.f + gi * (1.f - s));
        du[i] = dy[i] * gi * s;
    }
}
