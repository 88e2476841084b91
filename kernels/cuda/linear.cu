// The elementwise pieces around the projections' cuBLAS GEMMs (y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ):
// the bias written into y before the GEMMs accumulate onto it (beta = 1, so the bias, the base
// product and the low-rank product land in y with no extra pass over it), and the rounding of
// f32 activations to bf16 for the bf16 base GEMM (round to nearest even, as the CPU path and
// PyTorch round).
#include "common.cuh"

extern "C" __global__ void whet_fill_rows_f32(float* __restrict__ y, const float* __restrict__ b,
                                              size_t rows, int n) {
    const size_t total = rows * (size_t)n;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = b[i % n];
}

extern "C" __global__ void whet_f32_to_bf16(const float* __restrict__ x,
                                            __nv_bfloat16* __restrict__ y, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16_rn(x[i]);
}
