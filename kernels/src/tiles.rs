//! Tile sizes of the attention kernels: one table, read by the crate (launch geometry) and by
//! `build.rs` (which writes it into `whet_tiles.h` for the CUDA sources), so the grid the launch
//! code computes and the tiles the kernels were compiled with cannot drift apart.
//!
//! Each head-dimension class is `dpl` floats per lane (a warp of 32 lanes spans a head of up to
//! `32·dpl` values). Every kernel keeps its tiles in static shared memory, which is limited to
//! 48 KiB without an opt-in; the sizes below are chosen to fit (checked by a test).

/// Warps per block of every attention kernel (128 threads).
pub const ATTN_WARPS: usize = 4;

/// The tiles of one head-dimension class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnTiles {
    /// Floats per lane: heads up to `32·dpl` wide.
    pub dpl: usize,
    /// Forward: keys per shared-memory tile (one per lane, so at most 32).
    pub fwd_keys: usize,
    /// Forward: query rows per warp.
    pub fwd_rows: usize,
    /// dQ pass: keys per tile.
    pub dq_keys: usize,
    /// dQ pass: query rows per warp.
    pub dq_rows: usize,
    /// dK/dV pass: queries per tile (one per lane).
    pub dkv_queries: usize,
    /// dK/dV pass: key rows per warp.
    pub dkv_rows: usize,
}

/// The classes, narrowest first: heads up to 64, 128 and 256 wide.
pub const ATTN_TILES: [AttnTiles; 3] = [
    AttnTiles {
        dpl: 2,
        fwd_keys: 32,
        fwd_rows: 4,
        dq_keys: 32,
        dq_rows: 4,
        dkv_queries: 32,
        dkv_rows: 4,
    },
    AttnTiles {
        dpl: 4,
        fwd_keys: 32,
        fwd_rows: 4,
        dq_keys: 32,
        dq_rows: 2,
        dkv_queries: 32,
        dkv_rows: 2,
    },
    AttnTiles {
        dpl: 8,
        fwd_keys: 16,
        fwd_rows: 2,
        dq_keys: 16,
        dq_rows: 1,
        dkv_queries: 16,
        dkv_rows: 1,
    },
];

/// The table as C preprocessor constants (`WHET_ATTN_WARPS`, and `WHET_D128_FWD_BK` … per
/// class): `whet_tiles.h`, which `build.rs` writes for nvcc (and the emulation tests for g++).
pub fn tiles_header() -> String {
    let mut h = String::from("// Generated from kernels/src/tiles.rs.\n#pragma once\n");
    h += &format!("#define WHET_ATTN_WARPS {ATTN_WARPS}\n");
    for t in ATTN_TILES {
        let d = 32 * t.dpl;
        for (name, v) in [
            ("FWD_BK", t.fwd_keys),
            ("FWD_RPW", t.fwd_rows),
            ("DQ_BK", t.dq_keys),
            ("DQ_RPW", t.dq_rows),
            ("DKV_BQ", t.dkv_queries),
            ("DKV_RPW", t.dkv_rows),
        ] {
            h += &format!("#define WHET_D{d}_{name} {v}\n");
        }
    }
    h
}
