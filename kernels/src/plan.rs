//! The GPU-free half of the engine's launch code: every shape check a kernel needs before it is
//! launched, and the tables the attention kernels read, from the shapes of the engine's tensors
//! (plain dims, no tensor types). Built and tested in every build, so a wrong size is caught on
//! a laptop, not as a bad memory access on a GPU.

use crate::geometry::{self, AttnPlan, AttnStrides, SeqDesc};

/// Why a launch was refused: the tensor and what is wrong with it.
pub type PlanResult<T> = Result<T, String>;

/// `(rows, width)` of a row-wise op over the last dimension of `dims`, checking that the weight
/// (or table) holds `width` values.
pub fn rows_of(what: &str, dims: &[usize], weight_len: usize) -> PlanResult<(usize, usize)> {
    let Some(&width) = dims.last() else {
        return Err(format!("{what}: a scalar has no rows"));
    };
    if width != weight_len {
        return Err(format!(
            "{what}: last dimension {width} but the weight has {weight_len} values"
        ));
    }
    let n: usize = dims.iter().product();
    let rows = n.checked_div(width).unwrap_or(0);
    geometry::to_i32(what, width).map_err(|e| e.0)?;
    Ok((rows, width))
}

/// RoPE on `x: (n, heads, d)` with `(n, d/2)` tables: `(n, heads, d)`, checked.
pub fn rope_dims(x: &[usize], cos: &[usize], sin: &[usize]) -> PlanResult<(usize, usize, usize)> {
    let &[n, heads, d] = x else {
        return Err(format!(
            "rope input: expected (n, heads, head_dim), got {x:?}"
        ));
    };
    if d % 2 != 0 {
        return Err(format!("rope input: head_dim {d} is odd"));
    }
    for (name, t) in [("cos", cos), ("sin", sin)] {
        if t != [n, d / 2] {
            return Err(format!(
                "rope {name} table: expected [{n}, {}], got {t:?}",
                d / 2
            ));
        }
    }
    for v in [n, heads, d] {
        geometry::to_i32("rope input", v).map_err(|e| e.0)?;
    }
    Ok((n, heads, d))
}

/// The logits chunk `(rows, vocab)` of the target-logprob kernels, with every target checked
/// against the vocabulary (the kernel would give NaN for one past it).
pub fn logits_dims(dims: &[usize], targets: &[u32]) -> PlanResult<(usize, usize)> {
    let &[rows, vocab] = dims else {
        return Err(format!("logits: expected (rows, vocab), got {dims:?}"));
    };
    if targets.len() != rows {
        return Err(format!(
            "target_tokens: {} for {rows} logits rows",
            targets.len()
        ));
    }
    if let Some((i, t)) = targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(format!(
            "target_tokens[{i}] = {t} is outside the vocabulary of {vocab}"
        ));
    }
    geometry::to_i32("vocab", vocab).map_err(|e| e.0)?;
    Ok((rows, vocab))
}

/// The cuBLAS sizes `(m, n, k)` of `y = x·Wᵀ` for `x: (m, k)` and `W: (n, k)`, checked, with the
/// LoRA pair's `A: (r, k)`, `B: (n, r)` when given.
pub fn linear_dims(
    x: &[usize],
    w: (usize, usize),
    lora: Option<(&[usize], &[usize])>,
) -> PlanResult<(usize, usize, usize)> {
    let &[m, k] = x else {
        return Err(format!(
            "linear input: expected (rows, in_features), got {x:?}"
        ));
    };
    let (n, wk) = w;
    if wk != k {
        return Err(format!(
            "linear input: {k} features but the weight takes {wk}"
        ));
    }
    if let Some((a, b)) = lora {
        let (&[r, ak], &[bn, br]) = (a, b) else {
            return Err(format!(
                "lora: expected A (r, in) and B (out, r), got {a:?} and {b:?}"
            ));
        };
        if ak != k || bn != n || br != r {
            return Err(format!(
                "lora: A {a:?} and B {b:?} do not fit a ({n}, {k}) projection"
            ));
        }
    }
    for v in [m, n, k] {
        geometry::to_i32("linear size", v).map_err(|e| e.0)?;
    }
    Ok((m, n, k))
}

/// An attention call, planned: descriptors, strides and tiles for the kernels.
#[derive(Debug, Clone)]
pub struct Attn {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Query rows in all (the length of lse and delta, times `heads`).
    pub rows: usize,
    /// The sequences, as the kernels read them.
    pub seqs: Vec<i64>,
    /// Strides of the query- and key-side tensors.
    pub strides: AttnStrides,
    /// Tile class and tiles.
    pub plan: AttnPlan,
}

fn heads_check(heads: usize, kv_heads: usize, what: &str) -> PlanResult<()> {
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(format!(
            "{what}: {heads} query heads do not group over {kv_heads} kv heads"
        ));
    }
    Ok(())
}

fn finish(
    seqs: Vec<SeqDesc>,
    strides: AttnStrides,
    (heads, kv_heads, head_dim, rows): (usize, usize, usize, usize),
) -> PlanResult<Attn> {
    let plan = AttnPlan::new(&seqs, head_dim).map_err(|e| e.0)?;
    let table = geometry::seq_table(&seqs).map_err(|e| e.0)?;
    Ok(Attn {
        heads,
        kv_heads,
        head_dim,
        rows,
        seqs: table,
        strides,
        plan,
    })
}

/// Packed attention: `q: (N, H, D)`, `k, v: (N, Hkv, D)`, sequences of `lens`.
pub fn packed(q: &[usize], k: &[usize], v: &[usize], lens: &[usize]) -> PlanResult<Attn> {
    let (&[n, h, d], &[nk, hk, dk]) = (q, k) else {
        return Err(format!(
            "packed attention: expected (N, heads, D) tensors, got {q:?}, {k:?}"
        ));
    };
    if v != k || nk != n || dk != d {
        return Err(format!(
            "packed attention: q {q:?}, k {k:?}, v {v:?} do not fit"
        ));
    }
    heads_check(h, hk, "packed attention")?;
    let total: usize = lens.iter().sum();
    if total != n {
        return Err(format!(
            "packed attention: lens cover {total} tokens of {n}"
        ));
    }
    let (seqs, strides) = geometry::packed(lens, h, hk, d);
    finish(seqs, strides, (h, hk, d, n))
}

/// Batched attention: `q: (B, H, T, D)`, `k, v: (B, Hkv, S, D)`, queries at key positions
/// `offset ..`, left padding `pad` (empty: none).
pub fn batched(
    q: &[usize],
    k: &[usize],
    v: &[usize],
    offset: usize,
    pad: &[usize],
) -> PlanResult<Attn> {
    let (&[b, h, t, d], &[bk, hk, s, dk]) = (q, k) else {
        return Err(format!(
            "attention: expected (B, heads, T, D) tensors, got {q:?}, {k:?}"
        ));
    };
    if v != k || bk != b || dk != d {
        return Err(format!("attention: q {q:?}, k {k:?}, v {v:?} do not fit"));
    }
    if !pad.is_empty() && pad.len() != b {
        return Err(format!("attention: {} pads for a batch of {b}", pad.len()));
    }
    heads_check(h, hk, "attention")?;
    let (seqs, strides) = geometry::batched(b, (h, t), (hk, s), d, offset, pad);
    finish(seqs, strides, (h, hk, d, b * t))
}

/// Decoding over a KV cache: `q: (B, H, T, D)` (the `T` newest tokens of each row) over the
/// first `keys` slots of cache buffers `k, v: (B, Hkv, capacity, D)`, read in place (the
/// capacity is the head stride, `keys` the keys that count); left padding `pad`.
pub fn decode(
    q: &[usize],
    k: &[usize],
    v: &[usize],
    keys: usize,
    pad: &[usize],
) -> PlanResult<Attn> {
    let (&[b, h, t, d], &[bk, hk, cap, dk]) = (q, k) else {
        return Err(format!(
            "decode attention: expected (B, heads, T, D), got {q:?}, {k:?}"
        ));
    };
    if v != k || bk != b || dk != d || keys > cap || t > keys {
        return Err(format!(
            "decode attention: q {q:?} over {keys} slots of a cache {k:?} (v {v:?})"
        ));
    }
    if !pad.is_empty() && pad.len() != b {
        return Err(format!(
            "decode attention: {} pads for a batch of {b}",
            pad.len()
        ));
    }
    heads_check(h, hk, "decode attention")?;
    let (mut seqs, strides) = geometry::batched(b, (h, t), (hk, cap), d, keys - t, pad);
    for s in &mut seqs {
        s.k_len = keys;
    }
    finish(seqs, strides, (h, hk, d, b * t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_op_checks_name_the_tensor() {
        assert_eq!(rows_of("rms_norm", &[5, 3, 8], 8).unwrap(), (15, 8));
        let e = rows_of("rms_norm q_norm", &[5, 3, 8], 4).unwrap_err();
        assert!(
            e.contains("q_norm") && e.contains('8') && e.contains('4'),
            "{e}"
        );
        assert!(rows_of("x", &[], 1).is_err());
        assert_eq!(rows_of("x", &[0, 8], 8).unwrap(), (0, 8));
    }

    #[test]
    fn rope_and_logits_checks() {
        assert_eq!(rope_dims(&[4, 3, 8], &[4, 4], &[4, 4]).unwrap(), (4, 3, 8));
        assert!(rope_dims(&[4, 3, 7], &[4, 3], &[4, 3])
            .unwrap_err()
            .contains("odd"));
        assert!(rope_dims(&[4, 3, 8], &[4, 4], &[3, 4])
            .unwrap_err()
            .contains("sin"));
        assert_eq!(logits_dims(&[2, 10], &[0, 9]).unwrap(), (2, 10));
        let e = logits_dims(&[2, 10], &[0, 10]).unwrap_err();
        assert!(e.contains("target_tokens[1]") && e.contains("10"), "{e}");
        assert!(logits_dims(&[2, 10], &[0]).is_err());
    }

    #[test]
    fn linear_checks() {
        assert_eq!(linear_dims(&[5, 8], (6, 8), None).unwrap(), (5, 6, 8));
        let (a, b) = ([3usize, 8], [6usize, 3]);
        assert!(linear_dims(&[5, 8], (6, 8), Some((&a, &b))).is_ok());
        assert!(linear_dims(&[5, 7], (6, 8), None)
            .unwrap_err()
            .contains("7 features"));
        let bad = [6usize, 4];
        assert!(linear_dims(&[5, 8], (6, 8), Some((&a, &bad)))
            .unwrap_err()
            .contains("lora"));
    }

    #[test]
    fn attention_plans() {
        let p = packed(&[9, 4, 64], &[9, 2, 64], &[9, 2, 64], &[3, 5, 1]).unwrap();
        assert_eq!(
            (p.rows, p.seqs.len(), p.plan.suffix()),
            (9, 21, "d64".to_string())
        );
        assert!(packed(&[9, 4, 64], &[9, 3, 64], &[9, 3, 64], &[9])
            .unwrap_err()
            .contains("group"));
        assert!(packed(&[9, 4, 64], &[9, 2, 64], &[9, 2, 64], &[3, 5])
            .unwrap_err()
            .contains("lens"));
        assert!(packed(&[9, 4, 300], &[9, 2, 300], &[9, 2, 300], &[9])
            .unwrap_err()
            .contains("256"));
        let b = batched(
            &[2, 6, 3, 128],
            &[2, 2, 8, 128],
            &[2, 2, 8, 128],
            5,
            &[2, 0],
        )
        .unwrap();
        assert_eq!((b.rows, b.plan.suffix()), (6, "d128".to_string()));
        assert_eq!(b.strides.k_head, 8 * 128);
        assert!(batched(&[2, 6, 3, 128], &[2, 2, 8, 128], &[2, 2, 8, 128], 5, &[1]).is_err());
        let c = decode(&[2, 6, 1, 64], &[2, 2, 32, 64], &[2, 2, 32, 64], 9, &[3, 0]).unwrap();
        assert_eq!(
            (c.rows, c.strides.k_head, c.seqs[3], c.seqs[4]),
            (2, 32 * 64, 9, 8)
        );
        assert!(decode(&[2, 6, 1, 64], &[2, 2, 8, 64], &[2, 2, 8, 64], 9, &[]).is_err());
    }
}
