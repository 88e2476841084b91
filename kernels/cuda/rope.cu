// RoPE in Hugging Face's rotate-half layout on x: (n, heads, d) with per-row angle tables
// cos, sin: (n, d/2). Each (i, i + d/2) pair of every head rotates by its row's angle:
//   out[i]       = a·cos − b·sin
//   out[i + d/2] = b·cos + a·sin,     a = x[i], b = x[i + d/2]
// `sign` = −1 rotates backwards, which is the gradient (a rotation's transpose is its inverse),
// so one kernel serves forward and backward. One thread per pair.
#include "common.cuh"

extern "C" __global__ void whet_rope_f32(const float* __restrict__ x,
                                         const float* __restrict__ cos_t,
                                         const float* __restrict__ sin_t,
                                         float* __restrict__ out, int n, int heads, int d,
                                         float sign) {
    const int half = d / 2;
    const size_t pairs = (size_t)n * heads * half;
    for (size_t p = (size_t)blockIdx.x * blockDim.x + threadIdx.x; p < pairs;
         p += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)(p % half);
        const size_t rh = p / half;              // row · heads + head
        const size_t row = rh / heads;
        const size_t base = rh * d;
        const float c = cos_t[row * half + i], s = sign * sin_t[row * half + i];
        const float a = x[base + i], b = x[base + i + half];
        out[base + i] = a * c - b * s;
        out[base + i + half] = b * c + a * s;
    }
}
