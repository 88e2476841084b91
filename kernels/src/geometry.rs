//! Launch geometry: grids, blocks and the per-sequence tables of the attention kernels. Pure
//! Rust (no CUDA types), so it is built and tested everywhere; the engine turns a [`Launch`]
//! into cudarc's `LaunchConfig`.

use crate::tiles::{AttnTiles, ATTN_TILES, ATTN_WARPS};

/// A kernel launch: grid and block dimensions (x, y, z); no dynamic shared memory is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Blocks.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub block: (u32, u32, u32),
}

/// Threads per block of the elementwise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;

/// Blocks beyond which the elementwise kernels' grid-stride loops take over (enough to fill any
/// current GPU many times over; bounded so the count always fits the grid's x limit).
pub const ELEMENTWISE_MAX_BLOCKS: u32 = 1 << 16;

/// An error in a launch's sizes, naming what does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeometryError(pub String);

impl std::fmt::Display for GeometryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GeometryError {}

/// `v` as the `int` a kernel takes, or an error naming it.
pub fn to_i32(what: &str, v: usize) -> Result<i32, GeometryError> {
    i32::try_from(v).map_err(|_| GeometryError(format!("{what} = {v} does not fit a 32-bit int")))
}

/// A grid-stride elementwise kernel over `n` elements (at least one block, so a launch over
/// nothing is still a valid launch that does nothing).
pub fn elementwise(n: usize) -> Launch {
    let t = ELEMENTWISE_THREADS as usize;
    let blocks = n.div_ceil(t).clamp(1, ELEMENTWISE_MAX_BLOCKS as usize) as u32;
    Launch {
        grid: (blocks, 1, 1),
        block: (ELEMENTWISE_THREADS, 1, 1),
    }
}

/// One block per row of `width` values, for the row reductions (RMSNorm, log-sum-exp): about
/// four values per thread, a whole number of warps, 32 to 1024 threads.
pub fn per_row(rows: usize, width: usize) -> Result<Launch, GeometryError> {
    let threads = width.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32;
    let rows = u32::try_from(rows)
        .ok()
        .filter(|&r| r <= i32::MAX as u32)
        .ok_or_else(|| GeometryError(format!("{rows} rows exceed one launch")))?;
    Ok(Launch {
        grid: (rows.max(1), 1, 1),
        block: (threads, 1, 1),
    })
}

/// The tile class for heads `head_dim` wide: the narrowest that holds them.
pub fn attn_class(head_dim: usize) -> Result<AttnTiles, GeometryError> {
    ATTN_TILES
        .into_iter()
        .find(|t| head_dim <= 32 * t.dpl && head_dim > 0)
        .ok_or_else(|| {
            GeometryError(format!(
                "head_dim {head_dim}: the CUDA attention kernels take heads 1 to 256 wide"
            ))
        })
}

/// Where one sequence of an attention call lies (see `cuda/attention.cu`): the offsets of its
/// (row 0, head 0) element in the query-side and key-side tensors, its query and key counts,
/// the position of its first query among its keys, its first visible key, and the global index
/// of its first query row (for lse and delta, laid out (rows, heads)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqDesc {
    /// Element offset of (row 0, head 0) in q, o, dO, dQ.
    pub q_base: usize,
    /// Element offset of (row 0, head 0) in k, v, dK, dV.
    pub k_base: usize,
    /// Queries.
    pub q_len: usize,
    /// Keys.
    pub k_len: usize,
    /// Key position of query 0.
    pub offset: usize,
    /// First visible key (left padding).
    pub lo: usize,
    /// Global row of query 0.
    pub row0: usize,
}

/// The strides of an attention call's tensors, in elements: query-side rows and heads,
/// key-side rows and heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnStrides {
    /// Between query rows.
    pub q_row: usize,
    /// Between query heads.
    pub q_head: usize,
    /// Between key rows.
    pub k_row: usize,
    /// Between key heads.
    pub k_head: usize,
}

/// Packed sequences of `lens` tokens in `(N, heads, d)` / `(N, kv_heads, d)` tensors.
pub fn packed(
    lens: &[usize],
    heads: usize,
    kv_heads: usize,
    d: usize,
) -> (Vec<SeqDesc>, AttnStrides) {
    let mut start = 0;
    let seqs = lens
        .iter()
        .map(|&len| {
            let s = SeqDesc {
                q_base: start * heads * d,
                k_base: start * kv_heads * d,
                q_len: len,
                k_len: len,
                offset: 0,
                lo: 0,
                row0: start,
            };
            start += len;
            s
        })
        .collect();
    let strides = AttnStrides {
        q_row: heads * d,
        q_head: d,
        k_row: kv_heads * d,
        k_head: d,
    };
    (seqs, strides)
}

/// A batch in `(B, heads, T, d)` / `(B, kv_heads, S, d)` tensors: row `b`'s queries sit at
/// key positions `offset ..`, and it sees no key below `pad[b]` (`pad` empty: none).
pub fn batched(
    batch: usize,
    (heads, t): (usize, usize),
    (kv_heads, s): (usize, usize),
    d: usize,
    offset: usize,
    pad: &[usize],
) -> (Vec<SeqDesc>, AttnStrides) {
    let seqs = (0..batch)
        .map(|b| SeqDesc {
            q_base: b * heads * t * d,
            k_base: b * kv_heads * s * d,
            q_len: t,
            k_len: s,
            offset,
            lo: pad.get(b).copied().unwrap_or(0),
            row0: b * t,
        })
        .collect();
    let strides = AttnStrides {
        q_row: d,
        q_head: t * d,
        k_row: d,
        k_head: s * d,
    };
    (seqs, strides)
}

/// The descriptors as the kernels read them: 7 int64 per sequence.
pub fn seq_table(seqs: &[SeqDesc]) -> Result<Vec<i64>, GeometryError> {
    let mut out = Vec::with_capacity(7 * seqs.len());
    for s in seqs {
        for v in [s.q_base, s.k_base, s.q_len, s.k_len, s.offset, s.lo, s.row0] {
            out.push(i64::try_from(v).map_err(|_| GeometryError(format!("offset {v} too large")))?);
        }
    }
    Ok(out)
}

/// Tiles of `per_tile` rows over each sequence's `len(seq)` rows: (sequence, first row) pairs,
/// flattened, one per block. A sequence with no rows has no tiles.
pub fn tiles(
    seqs: &[SeqDesc],
    len: impl Fn(&SeqDesc) -> usize,
    per_tile: usize,
) -> Result<Vec<i32>, GeometryError> {
    let mut out = vec![];
    for (i, s) in seqs.iter().enumerate() {
        let mut r = 0;
        while r < len(s) {
            out.push(to_i32("sequence index", i)?);
            out.push(to_i32("row", r)?);
            r += per_tile;
        }
    }
    Ok(out)
}

/// The three launches of one attention call and the tile tables they read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnPlan {
    /// The tile class (which `_d64`/`_d128`/`_d256` kernels).
    pub class: AttnTiles,
    /// Query tiles of the forward pass (pairs).
    pub fwd_tiles: Vec<i32>,
    /// Query tiles of the dQ pass.
    pub dq_tiles: Vec<i32>,
    /// Key tiles of the dK/dV pass.
    pub dkv_tiles: Vec<i32>,
}

impl AttnPlan {
    /// Plans an attention call over `seqs` with heads `head_dim` wide.
    pub fn new(seqs: &[SeqDesc], head_dim: usize) -> Result<Self, GeometryError> {
        let class = attn_class(head_dim)?;
        Ok(Self {
            class,
            fwd_tiles: tiles(seqs, |s| s.q_len, ATTN_WARPS * class.fwd_rows)?,
            dq_tiles: tiles(seqs, |s| s.q_len, ATTN_WARPS * class.dq_rows)?,
            dkv_tiles: tiles(seqs, |s| s.k_len, ATTN_WARPS * class.dkv_rows)?,
        })
    }

    /// The kernel-name suffix of the class (`d128`).
    pub fn suffix(&self) -> String {
        format!("d{}", 32 * self.class.dpl)
    }

    /// A launch over `tiles` (pairs) × `heads`.
    pub fn launch(tiles: &[i32], heads: usize) -> Result<Launch, GeometryError> {
        let blocks = u32::try_from(tiles.len() / 2)
            .map_err(|_| GeometryError("too many attention tiles".into()))?;
        let heads = u32::try_from(heads)
            .ok()
            .filter(|&h| h <= 65_535)
            .ok_or_else(|| GeometryError(format!("{heads} heads exceed the grid's y limit")))?;
        Ok(Launch {
            grid: (blocks, heads, 1),
            block: (32 * ATTN_WARPS as u32, 1, 1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elementwise_and_per_row_launches() {
        assert_eq!(elementwise(0).grid, (1, 1, 1));
        assert_eq!(elementwise(256).grid.0, 1);
        assert_eq!(elementwise(257).grid.0, 2);
        assert_eq!(elementwise(usize::MAX / 2).grid.0, ELEMENTWISE_MAX_BLOCKS);
        let l = per_row(10, 2048).unwrap();
        assert_eq!((l.grid.0, l.block.0), (10, 512));
        assert_eq!(per_row(3, 5).unwrap().block.0, 32);
        assert_eq!(per_row(3, 151_936).unwrap().block.0, 1024);
        assert!(per_row(1 << 40, 8).is_err());
        assert!(to_i32("vocab", 1 << 31).unwrap_err().0.contains("vocab"));
    }

    #[test]
    fn attention_classes_cover_head_dims_up_to_256() {
        assert_eq!(attn_class(64).unwrap().dpl, 2);
        assert_eq!(attn_class(65).unwrap().dpl, 4);
        assert_eq!(attn_class(128).unwrap().dpl, 4);
        assert_eq!(attn_class(80).unwrap().dpl, 4);
        assert_eq!(attn_class(256).unwrap().dpl, 8);
        assert!(attn_class(0).is_err());
        assert!(attn_class(257).unwrap_err().0.contains("257"));
    }

    /// The static shared memory each kernel declares (mirrors `cuda/attention.cu`), under the
    /// 48 KiB a kernel may use without an opt-in; and lanes map onto keys/queries one to one.
    #[test]
    fn attention_tiles_fit_shared_memory_and_a_warp() {
        for t in ATTN_TILES {
            let dm = 32 * t.dpl;
            let fwd = t.fwd_keys * (dm + 1) + t.fwd_keys * dm + ATTN_WARPS * t.fwd_rows * dm;
            let dq = 2 * t.dq_keys * (dm + 1) + 2 * ATTN_WARPS * t.dq_rows * dm;
            let dkv =
                2 * t.dkv_queries * (dm + 1) + 2 * ATTN_WARPS * t.dkv_rows * dm + 2 * t.dkv_queries;
            for (what, floats) in [("fwd", fwd), ("dq", dq), ("dkv", dkv)] {
                assert!(
                    floats * 4 <= 48 * 1024,
                    "{what} d{dm}: {} bytes",
                    floats * 4
                );
            }
            assert!(t.fwd_keys <= 32 && t.dq_keys <= 32 && t.dkv_queries <= 32);
        }
    }

    #[test]
    fn packed_descriptors_and_tiles() {
        let (seqs, st) = packed(&[3, 0, 20], 4, 2, 8);
        assert_eq!(
            st,
            AttnStrides {
                q_row: 32,
                q_head: 8,
                k_row: 16,
                k_head: 8
            }
        );
        assert_eq!(seqs[2].q_base, 3 * 32);
        assert_eq!(seqs[2].k_base, 3 * 16);
        assert_eq!((seqs[2].row0, seqs[2].q_len, seqs[2].offset), (3, 20, 0));
        let t = tiles(&seqs, |s| s.q_len, 16).unwrap();
        // seq 0: row 0; seq 1: none; seq 2: rows 0 and 16.
        assert_eq!(t, vec![0, 0, 2, 0, 2, 16]);
        let table = seq_table(&seqs).unwrap();
        assert_eq!(table.len(), 21);
        assert_eq!(&table[14..21], &[96, 48, 20, 20, 0, 0, 3]);
        let plan = AttnPlan::new(&seqs, 8).unwrap();
        assert_eq!(plan.suffix(), "d64");
        let l = AttnPlan::launch(&plan.fwd_tiles, 4).unwrap();
        assert_eq!(
            (l.grid, l.block.0),
            ((plan.fwd_tiles.len() as u32 / 2, 4, 1), 128)
        );
        assert!(AttnPlan::launch(&plan.fwd_tiles, 70_000).is_err());
    }

    #[test]
    fn batched_descriptors_read_b_h_t_d_in_place() {
        let (seqs, st) = batched(2, (6, 3), (2, 8), 4, 5, &[2, 0]);
        assert_eq!(
            st,
            AttnStrides {
                q_row: 4,
                q_head: 12,
                k_row: 4,
                k_head: 32
            }
        );
        assert_eq!(seqs[1].q_base, 6 * 3 * 4);
        assert_eq!(seqs[1].k_base, 2 * 8 * 4);
        assert_eq!(
            (seqs[0].lo, seqs[1].lo, seqs[1].row0, seqs[1].offset),
            (2, 0, 3, 5)
        );
        let (seqs, _) = batched(1, (1, 1), (1, 1), 4, 0, &[]);
        assert_eq!(seqs[0].lo, 0);
    }
}
