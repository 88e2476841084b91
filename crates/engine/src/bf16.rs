//! bf16 products with frozen weights on CPU: `y = x·Wᵀ` with `W` stored in bf16, the input
//! rounded to bf16, products exact and sums in f32.
//!
//! This is the numerics of a bf16 base model everywhere it is trained (PyTorch's bf16 linear on
//! CPU and GPU, whet's CUDA path): weights and activations carry 8 mantissa bits, accumulation
//! carries 24. On CPUs with AVX512_BF16 one `vdpbf16ps` does 32 multiply-adds, twice the f32
//! FMA rate, and the weights take half the memory traffic — which is what bounds decoding.
//! Elsewhere a portable loop computes the same sums in the same order (identical results up to
//! denormals, which the instruction flushes to zero).
//!
//! Layout: the `n` output rows of `W: (n, k)` are cut into panels of [`NR`] outputs; within a
//! panel, for each pair of input columns `(2j, 2j+1)`, the [`NR`] outputs' two bf16 values sit
//! side by side in one `u32` (element `2j` in the low half, as the instruction pairs them).
//! A panel is then read front to back, 128 bytes per input pair, while a few rows of `x` are
//! broadcast pair by pair against it.

use rayon::prelude::*;

/// Outputs per panel: two 16-lane f32 accumulators per row of `x`.
pub const NR: usize = 32;

/// Rows of `x` per register tile: `2·MR` accumulators, two weight registers, one broadcast.
const MR: usize = 12;

/// Rows of `x` per parallel work item (a panel stays in L2 while they pass over it).
const ROWS_PER_ITEM: usize = 192;

/// Rounds to bf16, to nearest with ties to even (as torch's `.to(torch.bfloat16)`).
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16.
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Two bf16 in one `u32`: `lo` in the low half.
fn pair(lo: f32, hi: f32) -> u32 {
    (to_bf16(lo) as u32) | ((to_bf16(hi) as u32) << 16)
}

/// A frozen matrix `W: (n, k)` in bf16, packed for `y = x·Wᵀ`.
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    /// `ceil(k / 2)`.
    pairs: usize,
    /// `[panel][pair][NR]`, zero beyond `n` and `k`.
    data: Vec<u32>,
}

impl PackedBf16 {
    /// Packs `W: (n, k)` given row-major.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        debug_assert_eq!(w.len(), n * k);
        Self::pack_with(n, k, |o, c| w[o * k + c])
    }

    /// Packs `Wᵀ` of a row-major `W: (rows, cols)`: the result multiplies as `y = x·W`,
    /// `x: (m, rows)` → `(m, cols)` (the input gradient of `x·Wᵀ`).
    pub fn pack_transposed(w: &[f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(w.len(), rows * cols);
        Self::pack_with(cols, rows, |o, c| w[c * cols + o])
    }

    fn pack_with(n: usize, k: usize, get: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * pairs * NR];
        let at = |o: usize, c: usize| if o < n && c < k { get(o, c) } else { 0.0 };
        data.par_chunks_mut(pairs * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for j in 0..pairs {
                    for i in 0..NR {
                        let o = p * NR + i;
                        panel[j * NR + i] = pair(at(o, 2 * j), at(o, 2 * j + 1));
                    }
                }
            });
        Self { n, k, pairs, data }
    }

    /// Outputs `n`.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Inputs `k`.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// Rows `W[o, :]` of the listed outputs as row-major f32 (an embedding lookup).
    pub fn gather_rows(&self, rows: &[u32]) -> Vec<f32> {
        let mut out = vec![0f32; rows.len() * self.k];
        for (&o, dst) in rows.iter().zip(out.chunks_mut(self.k.max(1))) {
            for (c, x) in dst.iter_mut().enumerate() {
                *x = self.value(o as usize, c);
            }
        }
        out
    }

    /// `W[o, c]` (its bf16 value).
    fn value(&self, o: usize, c: usize) -> f32 {
        let v = self.data[((o / NR) * self.pairs + c / 2) * NR + o % NR];
        from_bf16(if c.is_multiple_of(2) {
            v as u16
        } else {
            (v >> 16) as u16
        })
    }

    /// `W` back as row-major f32 (the bf16 values).
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        for (o, row) in w.chunks_mut(self.k.max(1)).enumerate() {
            for (c, x) in row.iter_mut().enumerate() {
                *x = self.value(o, c);
            }
        }
        w
    }

    /// `Wᵀ` packed the same way (for `y = x·W`), straight from this packing: exact, since
    /// the values are bf16 already, and without an f32 copy of the matrix in between.
    pub fn transposed(&self) -> Self {
        Self::pack_with(self.k, self.n, |o, c| self.value(c, o))
    }

    /// `y = x·Wᵀ` for row-major `x: (m, k)`; returns row-major `(m, n)`.
    pub fn matmul_xwt(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(x, m, fast_available())
    }

    /// As [`Self::matmul_xwt`], choosing the kernel (`fast`: AVX512_BF16, when the CPU has it).
    pub fn matmul_with(&self, x: &[f32], m: usize, fast: bool) -> Vec<f32> {
        debug_assert_eq!(x.len(), m * self.k);
        let (k, pairs, n) = (self.k, self.pairs, self.n);
        // x rounded to bf16 once, as pairs.
        let mut xb = vec![0u32; m * pairs];
        let convert = |(row, out): (usize, &mut [u32])| {
            let src = &x[row * k..(row + 1) * k];
            for (j, o) in out.iter_mut().enumerate() {
                let hi = src.get(2 * j + 1).copied().unwrap_or(0.0);
                *o = pair(src[2 * j], hi);
            }
        };
        if m * k >= 1 << 16 {
            xb.par_chunks_mut(pairs).enumerate().for_each(convert);
        } else {
            xb.chunks_mut(pairs).enumerate().for_each(convert);
        }
        let mut y = vec![0f32; m * n];
        let panels = n.div_ceil(NR);
        let row_blocks = m.div_ceil(ROWS_PER_ITEM).max(1);
        let out = SyncPtr(y.as_mut_ptr());
        let fast = fast && fast_available();
        (0..panels * row_blocks).into_par_iter().for_each(|item| {
            let (p, rb) = (item / row_blocks, item % row_blocks);
            let panel = &self.data[p * pairs * NR..(p + 1) * pairs * NR];
            let cols = NR.min(n - p * NR);
            let rows = (rb * ROWS_PER_ITEM)..m.min((rb + 1) * ROWS_PER_ITEM);
            let mut r0 = rows.start;
            while r0 < rows.end {
                let r = MR.min(rows.end - r0);
                let xs = &xb[r0 * pairs..(r0 + r) * pairs];
                // SAFETY: each work item writes the columns of its own panel in its own rows,
                // so no two items touch the same element; `y` outlives the parallel loop.
                let dst = unsafe { out.get().add(r0 * n + p * NR) };
                tile(fast, r, xs, pairs, panel, dst, n, cols);
                r0 += r;
            }
        });
        y
    }
}

struct SyncPtr(*mut f32);
// SAFETY: used only to write disjoint elements from parallel work items (see `matmul_with`).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Whether this CPU runs the AVX512_BF16 kernel.
pub fn fast_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `r ≤ MR` rows of `x` (pairs, row stride `pairs`) against one panel; writes `cols` outputs
/// per row at `dst` (row stride `ld`).
#[allow(clippy::too_many_arguments)]
fn tile(
    fast: bool,
    r: usize,
    x: &[u32],
    pairs: usize,
    panel: &[u32],
    dst: *mut f32,
    ld: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        macro_rules! go {
            ($($n:literal)*) => {
                match r {
                    // SAFETY: the CPU has AVX512_BF16 (checked by the caller); slices cover
                    // `r` rows of `pairs` and `pairs · NR` panel entries; `dst` as above.
                    $($n => unsafe { avx512::tile::<$n>(x, pairs, panel, dst, ld, cols) },)*
                    _ => unreachable!("tile of {r} rows"),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8 9 10 11 12);
        return;
    }
    let _ = fast;
    portable_tile(r, x, pairs, panel, dst, ld, cols);
}

/// The same sums as `vdpbf16ps`, in its order: per lane, `acc += w₂ⱼ₊₁·x₂ⱼ₊₁` then
/// `acc += w₂ⱼ·x₂ⱼ` (each product exact in f32, each sum rounded).
fn portable_tile(
    r: usize,
    x: &[u32],
    pairs: usize,
    panel: &[u32],
    dst: *mut f32,
    ld: usize,
    cols: usize,
) {
    let lo = |v: u32| f32::from_bits(v << 16);
    let hi = |v: u32| f32::from_bits(v & 0xffff_0000);
    for row in 0..r {
        let mut acc = [0f32; NR];
        let xr = &x[row * pairs..(row + 1) * pairs];
        for (j, &xv) in xr.iter().enumerate() {
            let (x0, x1) = (lo(xv), hi(xv));
            let w = &panel[j * NR..(j + 1) * NR];
            for (a, &wv) in acc.iter_mut().zip(w) {
                *a += hi(wv) * x1;
                *a += lo(wv) * x0;
            }
        }
        for (c, &a) in acc.iter().enumerate().take(cols) {
            // SAFETY: the caller's `dst` spans `r` rows of `ld` with `cols` valid columns.
            unsafe { *dst.add(row * ld + c) = a };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::NR;

    /// The same 512 bits, typed as 32 bf16.
    ///
    /// # Safety
    /// None beyond `transmute`'s between two plain 64-byte vector types.
    #[inline(always)]
    unsafe fn as_bf16(v: __m512i) -> __m512bh {
        // SAFETY: same size, any bit pattern valid.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// `R` rows against one panel: `2·R` accumulators of 16 outputs each stay in registers
    /// for the whole reduction.
    ///
    /// # Safety
    /// The CPU must have AVX512F and AVX512_BF16; `x` holds `R · pairs` entries, `panel`
    /// `pairs · NR`; `dst` is writable for `R` rows of stride `ld`, `cols ≤ NR` columns.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile<const R: usize>(
        x: &[u32],
        pairs: usize,
        panel: &[u32],
        dst: *mut f32,
        ld: usize,
        cols: usize,
    ) {
        debug_assert!(x.len() >= R * pairs && panel.len() >= pairs * NR);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let xp = x.as_ptr();
        let wp = panel.as_ptr();
        for j in 0..pairs {
            // SAFETY (all loads): in bounds by the contract above.
            let (w0, w1) = unsafe {
                (
                    _mm512_loadu_si512(wp.add(j * NR) as *const __m512i),
                    _mm512_loadu_si512(wp.add(j * NR + 16) as *const __m512i),
                )
            };
            // SAFETY: both are 512 bits of plain data; the instruction reads them as bf16 pairs.
            let (w0, w1) = unsafe { (as_bf16(w0), as_bf16(w1)) };
            for (row, a) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_epi32(unsafe { *xp.add(row * pairs + j) } as i32);
                // SAFETY: as above.
                let b = unsafe { as_bf16(b) };
                a[0] = _mm512_dpbf16_ps(a[0], w0, b);
                a[1] = _mm512_dpbf16_ps(a[1], w1, b);
            }
        }
        let mask0: __mmask16 = if cols >= 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as u16
        };
        let mask1: __mmask16 = if cols >= NR {
            0xffff
        } else if cols > 16 {
            ((1u32 << (cols - 16)) - 1) as u16
        } else {
            0
        };
        for (row, a) in acc.iter().enumerate() {
            // SAFETY: masked to the valid columns of this row.
            unsafe {
                let d = dst.add(row * ld);
                _mm512_mask_storeu_ps(d, mask0, a[0]);
                _mm512_mask_storeu_ps(d.add(16), mask1, a[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// f64 reference on the bf16-rounded inputs.
    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
        let r = |v: f32| from_bf16(to_bf16(v)) as f64;
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for o in 0..n {
                y[i * n + o] = (0..k).map(|c| r(x[i * k + c]) * r(w[o * k + c])).sum();
            }
        }
        y
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(from_bf16(to_bf16(1.0 + 2f32.powi(-8))), 1.0);
        // 1 + 3·2^-8 is halfway too: the even neighbour is 1 + 2^-6.
        assert_eq!(
            from_bf16(to_bf16(1.0 + 3.0 * 2f32.powi(-8))),
            1.0 + 2f32.powi(-6)
        );
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    #[test]
    fn matches_reference_on_ragged_shapes() {
        // Odd k, n not a multiple of the panel, m not a multiple of the tile, and a block
        // boundary between parallel row items.
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 33, 7),
            (13, 70, 64),
            (200, 45, 97),
            (16, 96, 576),
        ] {
            let x = random(m * k, 1);
            let w = random(n * k, 2);
            let packed = PackedBf16::pack(&w, n, k);
            let want = reference(&x, m, &w, n, k);
            for fast in [false, true] {
                let y = packed.matmul_with(&x, m, fast);
                for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
                    let tol = 1e-6 * (k as f64).sqrt() * 4.0 + 1e-6 * b.abs();
                    assert!(
                        (a as f64 - b).abs() <= tol,
                        "({m},{n},{k}) fast={fast} element {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn fast_and_portable_kernels_agree_exactly() {
        let (m, n, k) = (29, 77, 130);
        let packed = PackedBf16::pack(&random(n * k, 3), n, k);
        let x = random(m * k, 4);
        if !fast_available() {
            return; // nothing to compare on this CPU
        }
        assert_eq!(
            packed.matmul_with(&x, m, true),
            packed.matmul_with(&x, m, false)
        );
    }

    #[test]
    fn transposed_packing_gives_x_times_w() {
        let (m, rows, cols) = (5, 40, 36);
        let w = random(rows * cols, 5);
        let x = random(m * rows, 6);
        let packed = PackedBf16::pack_transposed(&w, rows, cols);
        assert_eq!((packed.rows(), packed.cols()), (cols, rows));
        // Wᵀ row-major is (cols, rows).
        let mut wt = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                wt[c * rows + r] = w[r * cols + c];
            }
        }
        let want = reference(&x, m, &wt, cols, rows);
        let y = packed.matmul_xwt(&x, m);
        for (&a, &b) in y.iter().zip(&want) {
            assert!((a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
        // And the packed values are the bf16 roundings of Wᵀ.
        let back = packed.unpack();
        for (&a, &b) in back.iter().zip(&wt) {
            assert_eq!(a, from_bf16(to_bf16(b)));
        }
        // Transposing a packing packs the transpose.
        let direct = PackedBf16::pack(&w, rows, cols);
        assert_eq!(direct.transposed().unpack(), back);
        assert_eq!(direct.transposed().transposed().unpack(), direct.unpack());
    }
}
