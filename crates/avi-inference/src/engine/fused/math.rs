//! Branch-free f64 sine, cosine and exponential for the fused engine's
//! nonlinear term, so that its loop over observations vectorises (the
//! standard library's `sin_cos` and `exp` are calls into libm, one value at
//! a time). Accurate to a few ulps on their domains; the caller falls back
//! to the standard library outside them (see [`TRIG_LIMIT`]).

use std::f64::consts::{FRAC_2_PI, FRAC_PI_2};

/// |z| below which [`sin_cos`] is accurate (its reduction by π/2 is exact
/// while the quadrant index has at most 20 bits, i.e. |z| < 1.6e6).
pub(crate) const TRIG_LIMIT: f64 = 1e5;

/// 1.5·2⁵²: adding it rounds a value below 2⁵¹ in magnitude to an integer
/// (to nearest) that sits in the low bits of the sum.
const SHIFT: f64 = 6_755_399_441_055_744.0;

/// π/2 in three parts: P1 is `FRAC_PI_2` with its 20 low bits cleared (33
/// significant bits, so k·P1 is exact for |k| < 2²⁰), P2 the rest of
/// `FRAC_PI_2` (20 bits: k·P2 exact), P3 = π/2 − `FRAC_PI_2`.
const P1: f64 = f64::from_bits(FRAC_PI_2.to_bits() & !0xF_FFFF);
const P2: f64 = FRAC_PI_2 - P1;
const P3: f64 = 6.123_233_995_736_766e-17;

/// 1/k!.
const fn inv_factorial(k: u32) -> f64 {
    let mut f = 1.0;
    let mut i = 2;
    while i <= k {
        f *= i as f64;
        i += 1;
    }
    1.0 / f
}

/// (sin z, cos z) for |z| < [`TRIG_LIMIT`]: z = kπ/2 + r with |r| ≤ π/4
/// (Cody–Waite reduction with the three parts of π/2), Taylor polynomials
/// of sin r to r¹⁷ and cos r to r¹⁶ (truncation ≤ 1e-19) evaluated by
/// Estrin's scheme (short dependency chains, so consecutive elements
/// overlap in the pipeline), then a rotation by k quarter turns.
#[inline(always)]
pub(crate) fn sin_cos(z: f64) -> (f64, f64) {
    let t = z * FRAC_2_PI + SHIFT;
    let q = t.to_bits();
    let k = t - SHIFT;
    let r = ((z - k * P1) - k * P2) - k * P3;
    let y = r * r;
    let (y2, y4) = (y * y, y * y * (y * y));
    let y8 = y4 * y4;
    // sin r = r Σ_j (−y)^j / (2j + 1)!, cos r = Σ_j (−y)^j / (2j)!, j ≤ 8.
    let s = r
        * (((1.0 - y * inv_factorial(3)) + y2 * (inv_factorial(5) - y * inv_factorial(7)))
            + y4 * ((inv_factorial(9) - y * inv_factorial(11))
                + y2 * (inv_factorial(13) - y * inv_factorial(15)))
            + y8 * inv_factorial(17));
    let c = ((1.0 - y * inv_factorial(2)) + y2 * (inv_factorial(4) - y * inv_factorial(6)))
        + y4 * ((inv_factorial(8) - y * inv_factorial(10))
            + y2 * (inv_factorial(12) - y * inv_factorial(14)))
        + y8 * inv_factorial(16);
    quarter_turns(q, s, c)
}

/// eˣ for |x| ≤ 1: x = k ln 2 + r with k ∈ {−1, 0, 1} the nearest integer
/// to x / ln 2 (k ln 2 is exact) and |r| ≤ ln 2 / 2, the Taylor polynomial
/// of eʳ to r¹² (truncation ≤ 2e-16 relative) by Estrin's scheme, then the
/// exact scaling by 2ᵏ through the exponent bits.
#[inline(always)]
pub(crate) fn exp_unit(x: f64) -> f64 {
    let t = x * std::f64::consts::LOG2_E + SHIFT;
    let k = t - SHIFT;
    let r = x - k * std::f64::consts::LN_2;
    let (r2, r4) = (r * r, r * r * (r * r));
    let r8 = r4 * r4;
    let f = inv_factorial;
    let p = (((1.0 + r) + r2 * (f(2) + r * f(3)))
        + r4 * ((f(4) + r * f(5)) + r2 * (f(6) + r * f(7))))
        + r8 * (((f(8) + r * f(9)) + r2 * (f(10) + r * f(11))) + r4 * f(12));
    // t's low bits hold k (two's complement); 2ᵏ has exponent field 1023 + k.
    let k_bits = t.to_bits().wrapping_sub(SHIFT.to_bits());
    p * f64::from_bits(k_bits.wrapping_add(1023) << 52)
}

/// [`crate::forms::nonlinear_term`] with [`sin_cos`] and [`exp_unit`]
/// (valid for |z| < [`TRIG_LIMIT`]).
#[inline(always)]
pub(crate) fn nonlinear_term(theta: f64, z: f64, x: f64) -> (f64, f64, f64) {
    crate::forms::nonlinear_term_with(true, theta, z, x, sin_cos, exp_unit)
}

/// [`crate::forms::nonlinear_authors_term`] with [`sin_cos`] and
/// [`exp_unit`] (valid for |z| < [`TRIG_LIMIT`]).
#[inline(always)]
pub(crate) fn nonlinear_authors_term(theta: f64, z: f64, x: f64) -> (f64, f64, f64) {
    crate::forms::nonlinear_term_with(false, theta, z, x, sin_cos, exp_unit)
}

/// (sin, cos) of a + k·π/2 from (s, c) = (sin a, cos a): a rotation by k
/// quarter turns, k given by its two low bits.
#[inline(always)]
pub(crate) fn quarter_turns<T: std::ops::Neg<Output = T>>(k: u64, s: T, c: T) -> (T, T) {
    let (s, c) = if k & 1 != 0 { (c, -s) } else { (s, c) };
    if k & 2 != 0 {
        (-s, -c)
    } else {
        (s, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the standard library on a dense grid of |z| ≤ 20 (where the
    /// variational draws live) and on a sparse one up to [`TRIG_LIMIT`]:
    /// within 4e-16 absolute (two ulps of 1; measured 2.2e-16 on both
    /// grids); eˣ on [−1, 1] within 1e-15 relative (≈ 5 ulps of rounding in
    /// the polynomial and the reduction; measured 4.7e-16).
    #[test]
    fn functions_match_the_standard_library() {
        let mut worst = [0.0f64; 3];
        for i in -200_000..=200_000 {
            let z = f64::from(i) * 1e-4 + 1e-9;
            let (s, c) = sin_cos(z);
            let (ws, wc) = z.sin_cos();
            worst[0] = worst[0].max((s - ws).abs()).max((c - wc).abs());
        }
        for i in 0..=100_000 {
            let z = -TRIG_LIMIT + f64::from(i) * (2.0 * TRIG_LIMIT / 100_000.0) + 0.123;
            let (s, c) = sin_cos(z);
            let (ws, wc) = z.sin_cos();
            worst[1] = worst[1].max((s - ws).abs()).max((c - wc).abs());
        }
        for i in -10_000..=10_000 {
            let x = f64::from(i) * 1e-4;
            worst[2] = worst[2].max((exp_unit(x) - x.exp()).abs() / x.exp());
        }
        eprintln!("worst errors: {worst:?}");
        assert!(
            worst[0] <= 4e-16 && worst[1] <= 4e-16 && worst[2] <= 1e-15,
            "{worst:?}"
        );
    }

    /// The vectorisable term equals the model's on z ∈ [−30, 30] within
    /// 4e-15 · (1 + |ℓ| + |value|): the functions differ from libm's by an
    /// ulp or two, and ∂ℓ/∂z multiplies the sine's error by r² ≈ 2|ℓ|
    /// (measured worst: 1.0e-15 of that scale). Both objectives, the
    /// model's and the authors'.
    #[test]
    fn term_matches_the_model() {
        let mut worst = 0.0f64;
        type Term = fn(f64, f64, f64) -> (f64, f64, f64);
        let pairs: [(Term, Term); 2] = [
            (nonlinear_term, crate::forms::nonlinear_term),
            (nonlinear_authors_term, crate::forms::nonlinear_authors_term),
        ];
        for (fast, model) in pairs {
            for i in -3000..=3000 {
                let z = f64::from(i) * 0.01 + 0.003;
                let a = fast(0.7, z, 1.3);
                let b = model(0.7, z, 1.3);
                for (u, v) in [(a.0, b.0), (a.1, b.1), (a.2, b.2)] {
                    let scale = 1.0 + b.0.abs() + v.abs();
                    worst = worst.max((u - v).abs() / scale);
                    assert!((u - v).abs() <= 4e-15 * scale, "z = {z}: {a:?} vs {b:?}");
                }
            }
        }
        eprintln!("worst error / scale: {worst:.2e}");
    }
}
