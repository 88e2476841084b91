// The flash-style attention kernels (forward, dQ pass, dK/dV pass) under the CPU emulation
// (cuda_emu.h), against a double-precision reference of causal GQA attention and its gradient:
// packed sequences (an empty one, a one-token one, ones longer than a tile) for every head
// class, with and without a sliding window; padded batches behind a cache offset; decoding
// over cache buffers with room to spare (capacity > keys). Every output element must be
// written and within 1e-5 of the reference's scale. Exit status: the number of failures.
#include "cuda_emu.h"

#include "attention.cu"

#include <random>
#include <string>

// One sequence, as the kernels read it (see attention.cu).
struct SeqD {
    long long q_base, k_base, q_len, k_len, offset, lo, row0;
};

struct Case {
    std::string name;
    int heads, kv_heads, d, window;
    std::vector<SeqD> seqs;
    long long q_rs, q_hs, k_rs, k_hs;
    size_t nq, nk, rows;
};

// (N, H, D) / (N, Hkv, D) packed sequences of `lens`.
static Case packed(std::vector<int> lens, int h, int kvh, int d, int window) {
    Case c{"packed", h, kvh, d, window};
    long long start = 0;
    for (int l : lens) {
        c.seqs.push_back({start * h * d, start * kvh * d, l, l, 0, 0, start});
        start += l;
    }
    c.q_rs = h * d, c.q_hs = d, c.k_rs = kvh * d, c.k_hs = d;
    c.nq = start * h * d, c.nk = start * kvh * d, c.rows = start;
    return c;
}

// (B, H, T, D) queries over the first `keys` slots of (B, Hkv, cap, D) buffers, the queries
// at slots keys − T …, row b left-padded by pad[b].
static Case batched(int b, int h, int t, int kvh, int cap, int keys, int d, int window,
                    std::vector<int> pad) {
    Case c{"batched", h, kvh, d, window};
    for (int i = 0; i < b; ++i)
        c.seqs.push_back({(long long)i * h * t * d, (long long)i * kvh * cap * d, t, keys, keys - t,
                          pad.empty() ? 0 : pad[i], (long long)i * t});
    c.q_rs = d, c.q_hs = (long long)t * d, c.k_rs = d, c.k_hs = (long long)cap * d;
    c.nq = (size_t)b * h * t * d, c.nk = (size_t)b * kvh * cap * d, c.rows = (size_t)b * t;
    return c;
}

static bool sees(const SeqD& s, long long i, long long j, int w) {
    const long long qp = s.offset + i;
    return j >= s.lo && j <= qp && j < s.k_len && (w <= 0 || qp - j < w);
}

// (sequence, first row) tiles of `per` rows, as geometry::tiles makes them.
template <class F>
static std::vector<int> tiles(const Case& c, int per, F len) {
    std::vector<int> t;
    for (size_t s = 0; s < c.seqs.size(); ++s)
        for (long long r = 0; r < len(c.seqs[s]); r += per) {
            t.push_back((int)s);
            t.push_back((int)r);
        }
    return t;
}

struct Reference {
    std::vector<double> o, dq, dk, dv;
};

// Softmax attention and its gradient under output gradient dO, in double.
static Reference reference(const Case& c, const std::vector<float>& q, const std::vector<float>& k,
                           const std::vector<float>& v, const std::vector<float>& dO, float scale) {
    Reference r{std::vector<double>(c.nq), std::vector<double>(c.nq), std::vector<double>(c.nk),
                std::vector<double>(c.nk)};
    const int rep = c.heads / c.kv_heads;
    for (const auto& s : c.seqs)
        for (int h = 0; h < c.heads; ++h)
            for (long long i = 0; i < s.q_len; ++i) {
                const long long qo = s.q_base + h * c.q_hs + i * c.q_rs;
                auto krow = [&](long long j) { return s.k_base + (h / rep) * c.k_hs + j * c.k_rs; };
                std::vector<double> p(s.k_len, 0), dp(s.k_len, 0);
                double m = -1e300, sum = 0, delta = 0;
                for (long long j = 0; j < s.k_len; ++j)
                    if (sees(s, i, j, c.window)) {
                        double dot = 0;
                        for (int e = 0; e < c.d; ++e) dot += (double)q[qo + e] * k[krow(j) + e];
                        p[j] = dot * scale;
                        m = std::max(m, p[j]);
                    }
                for (long long j = 0; j < s.k_len; ++j) {
                    p[j] = sees(s, i, j, c.window) ? std::exp(p[j] - m) : 0;
                    sum += p[j];
                }
                for (long long j = 0; j < s.k_len; ++j) {
                    if (p[j] == 0) continue;
                    p[j] /= sum;
                    for (int e = 0; e < c.d; ++e) {
                        r.o[qo + e] += p[j] * v[krow(j) + e];
                        dp[j] += (double)dO[qo + e] * v[krow(j) + e];
                    }
                    delta += p[j] * dp[j];
                }
                for (long long j = 0; j < s.k_len; ++j) {
                    if (p[j] == 0) continue;
                    const double ds = p[j] * (dp[j] - delta);
                    for (int e = 0; e < c.d; ++e) {
                        r.dq[qo + e] += scale * ds * k[krow(j) + e];
                        r.dk[krow(j) + e] += scale * ds * q[qo + e];
                        r.dv[krow(j) + e] += p[j] * dO[qo + e];
                    }
                }
            }
    return r;
}

typedef void (*Fwd)(const float*, const float*, const float*, float*, float*, WHET_ATTN_ARGS);
typedef void (*Dq)(const float*, const float*, const float*, const float*, const float*,
                   const float*, float*, float*, WHET_ATTN_ARGS);
typedef void (*Dkv)(const float*, const float*, const float*, const float*, const float*,
                    const float*, float*, float*, WHET_ATTN_ARGS);

// The elements of the used rows only (cache buffers have unused capacity).
static std::vector<size_t> used(const Case& c, bool keys) {
    std::vector<size_t> idx;
    for (const auto& s : c.seqs)
        for (int h = 0; h < (keys ? c.kv_heads : c.heads); ++h)
            for (long long r = 0; r < (keys ? s.k_len : s.q_len); ++r)
                for (int e = 0; e < c.d; ++e)
                    idx.push_back(keys ? s.k_base + h * c.k_hs + r * c.k_rs + e
                                       : s.q_base + h * c.q_hs + r * c.q_rs + e);
    return idx;
}

static int check(const char* what, const Case& c, bool keys, const std::vector<float>& got,
                 const std::vector<double>& want) {
    std::vector<float> g;
    std::vector<double> w;
    for (size_t i : used(c, keys)) {
        g.push_back(got[i]);
        w.push_back(want[i]);
    }
    char name[96];
    snprintf(name, sizeof name, "  %s", what);
    return emu_check(name, g, w, 1e-5);
}

static int run(const Case& c, int fwd_rows, int dq_rows, int dkv_rows, Fwd fwd, Dq dq, Dkv dkv) {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1, 1);
    std::vector<float> q(c.nq), k(c.nk), v(c.nk), dO(c.nq);
    for (auto* a : {&q, &dO, &k, &v})
        for (auto& x : *a) x = u(rng);
    const float scale = 1.0f / std::sqrt((float)c.d);
    const Reference want = reference(c, q, k, v, dO, scale);
    std::vector<long long> seqs;
    for (const auto& s : c.seqs)
        for (long long x : {s.q_base, s.k_base, s.q_len, s.k_len, s.offset, s.lo, s.row0}) seqs.push_back(x);
    const size_t lrows = c.rows * c.heads;
    std::vector<float> o(c.nq, NAN), lse(lrows, NAN), delta(lrows, NAN), gq(c.nq, NAN), gk(c.nk, NAN),
        gv(c.nk, NAN);
    const auto qlen = [](const SeqD& s) { return s.q_len; };
    const auto klen = [](const SeqD& s) { return s.k_len; };
    const auto ft = tiles(c, WHET_ATTN_WARPS * fwd_rows, qlen);
    const auto qt = tiles(c, WHET_ATTN_WARPS * dq_rows, qlen);
    const auto kt = tiles(c, WHET_ATTN_WARPS * dkv_rows, klen);
    const dim3 block{WHET_ATTN_THREADS, 1, 1};
#define ARGS(T) seqs.data(), T.data(), c.heads, c.kv_heads, c.d, c.q_rs, c.q_hs, c.k_rs, c.k_hs, c.window, scale
    emu_launch({(unsigned)ft.size() / 2, (unsigned)c.heads, 1}, block,
               [&] { fwd(q.data(), k.data(), v.data(), o.data(), lse.data(), ARGS(ft)); });
    emu_launch({(unsigned)qt.size() / 2, (unsigned)c.heads, 1}, block, [&] {
        dq(q.data(), k.data(), v.data(), o.data(), dO.data(), lse.data(), delta.data(), gq.data(), ARGS(qt));
    });
    emu_launch({(unsigned)kt.size() / 2, (unsigned)c.kv_heads, 1}, block, [&] {
        dkv(q.data(), k.data(), v.data(), dO.data(), lse.data(), delta.data(), gk.data(), gv.data(), ARGS(kt));
    });
#undef ARGS
    printf("%s: head_dim %d, %d/%d heads, window %d, %zu sequences\n", c.name.c_str(), c.d, c.heads,
           c.kv_heads, c.window, c.seqs.size());
    return check("output", c, false, o, want.o) + check("dq", c, false, gq, want.dq) +
           check("dk", c, true, gk, want.dk) + check("dv", c, true, gv, want.dv);
}

#define RUN(C, D)                                                                         \
    run(C, WHET_D##D##_FWD_RPW, WHET_D##D##_DQ_RPW, WHET_D##D##_DKV_RPW, whet_attn_fwd_d##D, \
        whet_attn_dq_d##D, whet_attn_dkv_d##D)

int main() {
    int fails = 0;
    const std::vector<int> lens{5, 33, 1, 70};
    for (int w : {0, 16}) {
        fails += RUN(packed(lens, 8, 2, 64, w), 64);
        fails += RUN(packed(lens, 8, 2, 80, w), 128);  // a head narrower than its class
        fails += RUN(packed(lens, 8, 2, 128, w), 128);
        fails += RUN(packed(lens, 4, 2, 256, w), 256);
    }
    fails += RUN(packed({3, 0, 9}, 4, 4, 64, 0), 64);  // an empty sequence, no grouping
    fails += RUN(batched(1, 6, 7, 2, 7, 7, 64, 0, {}), 64);
    fails += RUN(batched(2, 6, 5, 2, 12, 12, 64, 0, {3, 0}), 64);
    fails += RUN(batched(2, 6, 5, 2, 12, 12, 64, 6, {0, 4}), 64);
    fails += RUN(batched(3, 6, 1, 2, 48, 30, 64, 0, {0, 10, 29}), 64);  // decoding, room to spare
    fails += RUN(batched(2, 4, 1, 2, 48, 30, 128, 8, {2, 0}), 128);
    printf("%d failures\n", fails);
    return fails;
}
