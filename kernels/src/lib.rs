//! whet's CUDA kernels: the CUDA C sources in `cuda/`, compiled to PTX by `build.rs` when the
//! `cuda` feature is on and embedded here as text ([`Module::ptx`]), and the launch geometry
//! their callers need ([`geometry`], [`tiles`]) — plain Rust, built and tested with or without
//! CUDA.
//!
//! Every kernel is f32 in, f32 out (the numerics policy: norms, RoPE, SwiGLU, attention and the
//! loss stay f32; only the frozen base products run in bf16, through cuBLAS), row-major and
//! contiguous. Each has a CPU reference in `whet-engine` (the op whose `cuda_fwd` launches it),
//! and `crates/engine/tests/cuda.rs` holds each to it on a GPU. Without one,
//! `tests/emulate.rs` runs the kernel sources on the CPU under a small CUDA emulation against
//! double-precision references, and `tests/ptxas.rs` assembles the PTX for sm_90.

pub mod geometry;
pub mod plan;
pub mod tiles;

/// One PTX module: a `cuda/*.cu` file and the kernels it exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Module {
    /// The file stem, also the name the module is loaded under.
    pub name: &'static str,
    /// Its `extern "C"` kernels.
    pub functions: &'static [&'static str],
}

/// RMSNorm forward and backward (`cuda/rmsnorm.cu`).
pub const RMSNORM: Module = Module {
    name: "rmsnorm",
    functions: &["whet_rmsnorm_fwd_f32", "whet_rmsnorm_bwd_f32"],
};

/// RoPE, rotate-half layout; the backward is the rotation with the sine negated (`cuda/rope.cu`).
pub const ROPE: Module = Module {
    name: "rope",
    functions: &["whet_rope_f32"],
};

/// SwiGLU forward and backward (`cuda/swiglu.cu`).
pub const SWIGLU: Module = Module {
    name: "swiglu",
    functions: &["whet_swiglu_fwd_f32", "whet_swiglu_bwd_f32"],
};

/// Target log-probabilities over a logits chunk, and their gradient (`cuda/xent.cu`).
pub const XENT: Module = Module {
    name: "xent",
    functions: &["whet_target_logprobs_f32", "whet_target_logprobs_bwd_f32"],
};

/// The bias fill and the bf16 rounding around the projections' GEMMs (`cuda/linear.cu`).
pub const LINEAR: Module = Module {
    name: "linear",
    functions: &["whet_fill_rows_f32", "whet_f32_to_bf16"],
};

/// Flash-style causal GQA attention: forward, dQ pass, dK/dV pass, for heads up to 64, 128
/// and 256 wide (`cuda/attention.cu`).
pub const ATTENTION: Module = Module {
    name: "attention",
    functions: &[
        "whet_attn_fwd_d64",
        "whet_attn_dq_d64",
        "whet_attn_dkv_d64",
        "whet_attn_fwd_d128",
        "whet_attn_dq_d128",
        "whet_attn_dkv_d128",
        "whet_attn_fwd_d256",
        "whet_attn_dq_d256",
        "whet_attn_dkv_d256",
    ],
};

/// Every module.
pub const MODULES: [Module; 6] = [RMSNORM, ROPE, SWIGLU, XENT, LINEAR, ATTENTION];

#[cfg(feature = "cuda")]
impl Module {
    /// The module's PTX, as nvcc wrote it at build time.
    pub fn ptx(&self) -> &'static str {
        match self.name {
            "rmsnorm" => include_str!(concat!(env!("OUT_DIR"), "/rmsnorm.ptx")),
            "rope" => include_str!(concat!(env!("OUT_DIR"), "/rope.ptx")),
            "swiglu" => include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx")),
            "xent" => include_str!(concat!(env!("OUT_DIR"), "/xent.ptx")),
            "linear" => include_str!(concat!(env!("OUT_DIR"), "/linear.ptx")),
            "attention" => include_str!(concat!(env!("OUT_DIR"), "/attention.ptx")),
            // MODULES is the whole list, and each arm above is one of its names.
            _ => "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cuda_source_is_a_module_and_names_are_unique() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
        let mut stems: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let p = e.unwrap().path();
                (p.extension()? == "cu").then(|| p.file_stem().unwrap().to_string_lossy().into())
            })
            .collect();
        stems.sort();
        let mut names: Vec<String> = MODULES.iter().map(|m| m.name.to_string()).collect();
        names.sort();
        assert_eq!(stems, names);
        let mut fns: Vec<&str> = MODULES
            .iter()
            .flat_map(|m| m.functions.iter().copied())
            .collect();
        let n = fns.len();
        fns.sort();
        fns.dedup();
        assert_eq!(fns.len(), n);
        // Each kernel is defined in its module's source (the attention ones by a macro).
        for m in MODULES {
            let src = std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join(format!("cuda/{}.cu", m.name)),
            )
            .unwrap();
            for f in m.functions {
                let macro_made = f.rsplit_once("_d").is_some_and(|(stem, d)| {
                    src.contains(&format!("{stem}_d##D")) && src.contains(&format!("INSTANCE({d},"))
                });
                assert!(
                    src.contains(&format!("void {f}(")) || macro_made,
                    "{f} in {}",
                    m.name
                );
            }
        }
    }
}
