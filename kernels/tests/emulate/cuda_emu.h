// A CPU emulation of the CUDA subset whet's kernels use, so that their logic — indexing, masks,
// tiling, reductions, the online softmax — can be checked against plain references with g++ on
// a machine without a GPU (tests/emulate.rs). It emulates semantics, not speed or memory
// behaviour: what it cannot catch is listed in tests/emulate.rs.
//
// - Each thread of a block is a std::thread (one per threadIdx for the whole grid); blocks run
//   one after another, so `__shared__` can be `static`: one block's arrays at a time.
// - __syncthreads() is a barrier of the block; between blocks every thread waits too.
// - Warp shuffles and votes exchange through per-thread slots with a barrier of the warp on
//   either side, so every lane must take part — as the kernels' full-mask calls require.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(x)
#define __shared__ static
using std::max;
using std::min;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// The synchronisation state of the block being run.
struct EmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<float> slots;
    std::vector<int> votes;
};
inline EmuBlock* emu_block;

inline void __syncthreads() { emu_block->block->arrive_and_wait(); }

// Every lane publishes v, then reads lane `src`'s.
inline float emu_exchange(float v, int src) {
    const int t = threadIdx.x, w = t >> 5;
    emu_block->slots[t] = v;
    emu_block->warps[w]->arrive_and_wait();
    const float r = emu_block->slots[w * 32 + src];
    emu_block->warps[w]->arrive_and_wait();
    return r;
}

inline float __shfl_xor_sync(unsigned, float v, int o) {
    return emu_exchange(v, (threadIdx.x & 31) ^ o);
}
inline float __shfl_sync(unsigned, float v, int src) { return emu_exchange(v, src); }

inline bool __any_sync(unsigned, bool p) {
    const int t = threadIdx.x, w = t >> 5;
    emu_block->votes[t] = p;
    emu_block->warps[w]->arrive_and_wait();
    bool any = false;
    for (int i = 0; i < 32; ++i) any |= emu_block->votes[w * 32 + i] != 0;
    emu_block->warps[w]->arrive_and_wait();
    return any;
}

typedef uint16_t __nv_bfloat16;

// Round to nearest even, NaN kept quiet (what the GPU instruction does).
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    if (x != x) return (uint16_t)((b >> 16) | 0x40);
    return (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

// Runs `kernel` (a call of the kernel with its arguments) over the grid.
inline void emu_launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    EmuBlock b;
    b.block = std::make_unique<std::barrier<>>(block.x);
    for (unsigned w = 0; w < block.x / 32; ++w)
        b.warps.push_back(std::make_unique<std::barrier<>>(32));
    b.slots.resize(block.x);
    b.votes.resize(block.x);
    emu_block = &b;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block.x; ++t)
        threads.emplace_back([&, t] {
            threadIdx.x = t;
            for (unsigned by = 0; by < grid.y; ++by)
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    blockIdx.x = bx;
                    blockIdx.y = by;
                    kernel();
                    b.block->arrive_and_wait();  // the block is done before the next reuses shared memory
                }
        });
    for (auto& th : threads) th.join();
}

// One block size per row, as geometry::per_row picks it.
inline unsigned emu_per_row_threads(int width) {
    return (unsigned)std::clamp(((width + 3) / 4 + 31) / 32 * 32, 32, 1024);
}

// Compares a kernel's output with a double-precision reference: max |Δ| within `tol` of the
// reference's largest magnitude, and no element left unwritten (outputs start as NaN).
inline int emu_check(const char* what, const std::vector<float>& got, const std::vector<double>& want,
                     double tol) {
    double scale = 1e-6, d = 0;
    long unwritten = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        scale = std::max(scale, std::abs(want[i]));
        if (std::isnan(got[i])) ++unwritten;
        else d = std::max(d, std::abs(got[i] - want[i]));
    }
    const bool ok = unwritten == 0 && d <= tol * scale;
    printf("%-34s max|d| %.2e  scale %.2e  unwritten %ld  %s\n", what, d, scale, unwritten,
           ok ? "ok" : "FAIL");
    return ok ? 0 : 1;
}
