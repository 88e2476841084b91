//! Helpers the unit tests of the fused ops share.

use candle_core::{Device, Tensor, Var};

use crate::kernels::values;

/// Asserts `a` and `b` agree within `tol` of `b`'s largest magnitude.
pub fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    let (a, b) = (values(a).unwrap(), values(b).unwrap());
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
    let d = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d <= tol * scale, "{what}: max diff {d} (scale {scale})");
}

/// A deterministic variable of `shape` with values in [-1, 1).
pub fn var(shape: &[usize], seed: u64) -> Var {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

/// Value and gradient of `f` (fused) and `g` (composite) w.r.t. the vars agree.
pub fn check(vars: &[&Var], f: &dyn Fn() -> Tensor, g: &dyn Fn() -> Tensor, what: &str) {
    let (yf, yg) = (f(), g());
    close(&yf, &yg, 1e-5, what);
    let w = Tensor::randn(0f32, 1.0, yf.shape(), &Device::Cpu).unwrap();
    let gf = (yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gg = (yg * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        close(
            gf.get(v).unwrap(),
            gg.get(v).unwrap(),
            1e-4,
            &format!("{what} grad {i}"),
        );
    }
}
