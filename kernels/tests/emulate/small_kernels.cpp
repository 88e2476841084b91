// RMSNorm, RoPE, SwiGLU, target logprobs, the bias fill and bf16 rounding, run under the CPU
// emulation (cuda_emu.h) and held to double-precision references of their formulas
// (tests/emulate.rs builds and runs this). Exit status: the number of failures.
#include "cuda_emu.h"

#include "linear.cu"
#include "rmsnorm.cu"
#include "rope.cu"
#include "swiglu.cu"
#include "xent.cu"

#include <random>

static std::mt19937 rng(3);

static std::vector<float> rnd(size_t n, float scale = 1) {
    std::uniform_real_distribution<float> u(-1, 1);
    std::vector<float> v(n);
    for (auto& x : v) x = scale * u(rng);
    return v;
}

static int rmsnorm() {
    int fails = 0;
    for (int d : {3, 96, 2048, 5000}) {  // under, at and over one block's 1024 threads × 4
        const int rows = 7;
        const float eps = 1e-5f;
        auto x = rnd(rows * d), w = rnd(d), g = rnd(rows * d);
        for (auto& v : w) v += 1.5f;
        std::vector<float> y(rows * d, NAN), dx(rows * d, NAN);
        const dim3 grid{(unsigned)rows, 1, 1}, block{emu_per_row_threads(d), 1, 1};
        emu_launch(grid, block, [&] { whet_rmsnorm_fwd_f32(x.data(), w.data(), y.data(), d, eps); });
        emu_launch(grid, block, [&] { whet_rmsnorm_bwd_f32(x.data(), w.data(), g.data(), dx.data(), d, eps); });
        std::vector<double> wy(rows * d), wdx(rows * d);
        for (int r = 0; r < rows; ++r) {
            double ss = 0, dot = 0;
            for (int i = 0; i < d; ++i) {
                ss += (double)x[r * d + i] * x[r * d + i];
                dot += (double)x[r * d + i] * g[r * d + i] * w[i];
            }
            const double inv = 1 / std::sqrt(ss / d + eps), c = inv * inv * inv * dot / d;
            for (int i = 0; i < d; ++i) {
                wy[r * d + i] = x[r * d + i] * inv * w[i];
                wdx[r * d + i] = inv * w[i] * g[r * d + i] - c * x[r * d + i];
            }
        }
        char name[64];
        snprintf(name, sizeof name, "rmsnorm forward d%d", d);
        fails += emu_check(name, y, wy, 2e-6);
        snprintf(name, sizeof name, "rmsnorm backward d%d", d);
        fails += emu_check(name, dx, wdx, 2e-6);
    }
    return fails;
}

static int rope() {
    const int n = 9, heads = 4, d = 64, half = d / 2;
    auto x = rnd(n * heads * d);
    std::vector<float> c(n * half), s(n * half);
    for (int r = 0; r < n; ++r)
        for (int i = 0; i < half; ++i) {
            const float a = r * 37 * std::pow(10000.f, -(float)i / half);
            c[r * half + i] = std::cos(a);
            s[r * half + i] = std::sin(a);
        }
    std::vector<float> y(n * heads * d, NAN), back(n * heads * d, NAN);
    // Fewer threads than pairs: the grid-stride loop has to cover the rest.
    emu_launch({3, 1, 1}, {256, 1, 1}, [&] { whet_rope_f32(x.data(), c.data(), s.data(), y.data(), n, heads, d, 1.f); });
    emu_launch({2, 1, 1}, {256, 1, 1}, [&] { whet_rope_f32(y.data(), c.data(), s.data(), back.data(), n, heads, d, -1.f); });
    std::vector<double> wy(n * heads * d), wx(x.begin(), x.end());
    for (int r = 0; r < n; ++r)
        for (int h = 0; h < heads; ++h)
            for (int i = 0; i < half; ++i) {
                const size_t b = (size_t)(r * heads + h) * d;
                const double a = x[b + i], bb = x[b + i + half];
                wy[b + i] = a * c[r * half + i] - bb * s[r * half + i];
                wy[b + i + half] = bb * c[r * half + i] + a * s[r * half + i];
            }
    return emu_check("rope forward", y, wy, 2e-6) + emu_check("rope backward (the inverse)", back, wx, 2e-6);
}

static int swiglu() {
    const size_t n = 13 * 300;
    auto g = rnd(n, 4), u = rnd(n), dy = rnd(n);
    std::vector<float> y(n, NAN), dg(n, NAN), du(n, NAN);
    emu_launch({4, 1, 1}, {256, 1, 1}, [&] { whet_swiglu_fwd_f32(g.data(), u.data(), y.data(), n); });
    emu_launch({4, 1, 1}, {256, 1, 1}, [&] { whet_swiglu_bwd_f32(g.data(), u.data(), dy.data(), dg.data(), du.data(), n); });
    std::vector<double> wy(n), wdg(n), wdu(n);
    for (size_t i = 0; i < n; ++i) {
        const double s = 1 / (1 + std::exp(-(double)g[i]));
        wy[i] = g[i] * s * u[i];
        wdg[i] = dy[i] * u[i] * s * (1 + g[i] * (1 - s));
        wdu[i] = dy[i] * g[i] * s;
    }
    return emu_check("swiglu forward", y, wy, 2e-6) + emu_check("swiglu backward dg", dg, wdg, 2e-6) +
           emu_check("swiglu backward du", du, wdu, 2e-6);
}

static int target_logprobs() {
    int fails = 0;
    for (int vocab : {10, 1000, 151936}) {  // smaller than, and many times, the block
        const int rows = 6;
        auto x = rnd((size_t)rows * vocab, 8);
        std::vector<uint32_t> t{3, (uint32_t)vocab - 1, 0, 5, 7, 1};
        std::vector<float> grad{1, 0, -2, 0.5, 0, 1};  // zeros: the no-exp rows
        std::vector<float> lp(rows, NAN), dx((size_t)rows * vocab, NAN);
        const dim3 grid{(unsigned)rows, 1, 1}, block{emu_per_row_threads(vocab), 1, 1};
        emu_launch(grid, block, [&] { whet_target_logprobs_f32(x.data(), t.data(), lp.data(), vocab); });
        emu_launch(grid, block, [&] { whet_target_logprobs_bwd_f32(x.data(), t.data(), grad.data(), dx.data(), vocab); });
        std::vector<double> wlp(rows), wdx((size_t)rows * vocab);
        for (int r = 0; r < rows; ++r) {
            const float* row = &x[(size_t)r * vocab];
            double m = -1e300, s = 0;
            for (int j = 0; j < vocab; ++j) m = std::max(m, (double)row[j]);
            for (int j = 0; j < vocab; ++j) s += std::exp(row[j] - m);
            const double lse = m + std::log(s);
            wlp[r] = row[t[r]] - lse;
            for (int j = 0; j < vocab; ++j)
                wdx[(size_t)r * vocab + j] = (j == (int)t[r] ? grad[r] : 0) - grad[r] * std::exp(row[j] - lse);
        }
        char name[64];
        snprintf(name, sizeof name, "target logprobs vocab %d", vocab);
        fails += emu_check(name, lp, wlp, 2e-6);
        snprintf(name, sizeof name, "target logprobs grad vocab %d", vocab);
        fails += emu_check(name, dx, wdx, 2e-6);
    }
    return fails;
}

static int linear_helpers() {
    const size_t rows = 37;
    const int n = 48;
    auto b = rnd(n);
    std::vector<float> y(rows * n, NAN);
    std::vector<double> wy(rows * n);
    emu_launch({7, 1, 1}, {256, 1, 1}, [&] { whet_fill_rows_f32(y.data(), b.data(), rows, n); });
    for (size_t i = 0; i < rows * n; ++i) wy[i] = b[i % n];
    int fails = emu_check("bias fill", y, wy, 0);
    // Ties go to even (1 + 2⁻⁸ → 1, 1 + 3·2⁻⁸ → 1 + 2⁻⁶), the rest to nearest.
    std::vector<float> xs{1.f, 1.00390625f, 1.01171875f, -3.14159f, 65504.f, 1e-30f};
    const uint16_t want[] = {0x3f80, 0x3f80, 0x3f82, 0xc049, 0x4780, 0x0da2};
    std::vector<uint16_t> got(xs.size());
    emu_launch({1, 1, 1}, {256, 1, 1}, [&] { whet_f32_to_bf16(xs.data(), got.data(), xs.size()); });
    bool ok = true;
    for (size_t i = 0; i < xs.size(); ++i) ok &= got[i] == want[i];
    printf("%-34s %s\n", "bf16 rounding", ok ? "ok" : "FAIL");
    return fails + !ok;
}

int main() {
    const int fails = rmsnorm() + rope() + swiglu() + target_logprobs() + linear_helpers();
    printf("%d failures\n", fails);
    return fails;
}
