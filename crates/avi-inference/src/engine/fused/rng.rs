//! The fused engines' standard normals: Philox4x32-10 (Salmon, Moraes, Dror
//! & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011), a
//! counter-based generator, and the Box–Muller transform in f32.
//!
//! A counter-based generator needs no state: the normals of observation n
//! and draws 4j..4j+3 of step t of a fit seeded s are one function of
//! (n, j, t, s), so a loop over observations has no dependency between
//! iterations and the compiler vectorises it (the transcendental functions
//! below are branch-free polynomials for the same reason). The scheme is the
//! one of the CUDA kernels (`crates/avi-cuda/kernels/fvi.cu`): counter
//! (n, j, t, 0) for the local draws and (j, 0, t, 1) for the θ draws, key =
//! the seed's two 32-bit halves, four normals per call by two Box–Muller
//! pairs. The CPU and CUDA fused engines therefore draw the same normals up
//! to the last bits of their logarithm, sine and cosine.
//!
//! The uniforms have 24 bits (u ∈ (0, 1] for the radius, [0, 1) for the
//! angle), so |ε| ≤ √(−2 ln 2⁻²⁴) ≈ 5.77; a standard normal exceeds that
//! with probability 8e-9, a truncation far below the Monte Carlo error of
//! any estimate made here.

use std::f32::consts::{LN_2, SQRT_2, TAU};

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// The high and low halves of the 64-bit product.
#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds of counter `c` under `key`.
#[inline(always)]
pub(crate) fn philox(mut c: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut k0, mut k1] = key;
    for _ in 0..10 {
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0];
        k0 = k0.wrapping_add(W0);
        k1 = k1.wrapping_add(W1);
    }
    c
}

/// The Philox key of a seed: its low and high 32 bits.
pub(crate) fn key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// ln u for u ∈ [2⁻²⁴, 1] (normal f32): u = 2^e m with m ∈ [√½, √2), and
/// ln m = 2 artanh(s), s = (m − 1)/(m + 1), |s| ≤ 0.172, by its series to
/// s⁹ (truncation ≤ 2|s|¹¹/11 ≈ 7e-10, below f32 rounding). ln 2 is split
/// in two parts so that e ln 2 keeps f32 accuracy.
#[inline(always)]
pub(crate) fn ln_unit(u: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // 0x3f317200: 16 bits, e·LN2_HI exact
    const LN2_LO: f32 = LN_2 - LN2_HI;
    let bits = u.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let big = m > SQRT_2;
    let m = if big { m * 0.5 } else { m };
    e += i32::from(big);
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = (((s2 * (1.0 / 9.0) + 1.0 / 7.0) * s2 + 1.0 / 5.0) * s2 + 1.0 / 3.0) * s2 + 1.0;
    let e = e as f32;
    e * LN2_HI + (e * LN2_LO + 2.0 * s * series)
}

/// (sin 2πu, cos 2πu) for u ∈ [0, 1): u = q/4 + r with q the nearest
/// quarter turn (exact in f32) and |2πr| ≤ π/4, Taylor polynomials to a⁹
/// and a¹⁰ (truncation ≤ 2e-9), then a rotation by q quarter turns.
#[inline(always)]
pub(crate) fn sin_cos_turn(u: f32) -> (f32, f32) {
    // Adding 1.5·2²³ rounds u·4 ∈ [0, 4) to an integer k in the low bits.
    const SHIFT: f32 = 12_582_912.0;
    let t = u * 4.0 + SHIFT;
    let q = t.to_bits();
    let a = (u - (t - SHIFT) * 0.25) * TAU;
    let a2 = a * a;
    let s = a
        * (1.0
            + a2 * (-1.0 / 6.0
                + a2 * (1.0 / 120.0 + a2 * (-1.0 / 5040.0 + a2 * (1.0 / 362_880.0)))));
    let c = 1.0
        + a2 * (-0.5
            + a2 * (1.0 / 24.0
                + a2 * (-1.0 / 720.0 + a2 * (1.0 / 40_320.0 + a2 * (-1.0 / 3_628_800.0)))));
    super::math::quarter_turns(u64::from(q), s, c)
}

/// Four standard normals from one Philox output: uniforms from the top 24
/// bits of each word, then two Box–Muller pairs (radius from words 0 and 2,
/// angle from words 1 and 3), in the order (r₀ cos, r₀ sin, r₂ cos, r₂ sin).
#[inline(always)]
pub(crate) fn normals4(r: [u32; 4]) -> [f32; 4] {
    const INV24: f32 = 1.0 / 16_777_216.0;
    let radius = |w: u32| (-2.0 * ln_unit(((w >> 8) as i32 as f32 + 1.0) * INV24)).sqrt();
    let angle = |w: u32| sin_cos_turn((w >> 8) as i32 as f32 * INV24);
    let (ra, rb) = (radius(r[0]), radius(r[2]));
    let ((sa, ca), (sb, cb)) = (angle(r[1]), angle(r[3]));
    [ra * ca, ra * sa, rb * cb, rb * sb]
}

/// The local normals of draws 4·`group` … 4·`group` + 3 of step `step`,
/// observations `start` … `start + len − 1`: `out` is `[4, len]`
/// row-major (row k holds draw 4·`group` + k).
#[inline(always)]
pub(crate) fn fill_local(key: [u32; 2], step: u32, group: u32, start: usize, out: &mut [f64]) {
    // f32 normals for up to CHUNK observations at a time (a loop of f32
    // lanes only, twice as wide as one that also writes f64), then widened.
    const CHUNK: usize = 128;
    let len = out.len() / 4;
    let mut buf = [[0.0f32; CHUNK]; 4];
    for at in (0..len).step_by(CHUNK) {
        let m = CHUNK.min(len - at);
        let [b0, b1, b2, b3] = &mut buf;
        for (i, (((a, b), c), d)) in b0[..m]
            .iter_mut()
            .zip(b1[..m].iter_mut())
            .zip(b2[..m].iter_mut())
            .zip(b3[..m].iter_mut())
            .enumerate()
        {
            let e = normals4(philox([(start + at + i) as u32, group, step, 0], key));
            (*a, *b, *c, *d) = (e[0], e[1], e[2], e[3]);
        }
        for (k, row) in buf.iter().enumerate() {
            for (o, e) in out[k * len + at..k * len + at + m]
                .iter_mut()
                .zip(&row[..m])
            {
                *o = f64::from(*e);
            }
        }
    }
}

/// ε_θ of draw `d` of step `step`.
pub(crate) fn theta_normal(key: [u32; 2], step: u32, d: usize) -> f64 {
    let e = normals4(philox([(d / 4) as u32, 0, step, 1], key));
    f64::from(e[d % 4])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The known-answer vectors of Philox4x32-10 published with Random123
    /// (`kat_vectors`): counter and key all zeros, all ones, and digits of π.
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    /// The polynomial logarithm, sine and cosine against the standard
    /// library's f64 functions over their input grids (every 7th 24-bit
    /// uniform for ln; 2²⁰ angles), within two f32 epsilons (2.4e-7)
    /// relative to max(1, |value|): a few ulps of f32, whose rounding is all
    /// that remains (the truncation errors are ≤ 2e-9). Measured: 5.2e-7
    /// absolute at ln u ≈ −16.6 (0.03 relative to the bound's 4.2e-6), 9.8e-8
    /// for the sine and cosine.
    #[test]
    fn transforms_are_f32_accurate() {
        const INV24: f64 = 1.0 / 16_777_216.0;
        let mut worst = (0.0f64, 0.0f64);
        for k in (0..1u32 << 24).step_by(7) {
            let u = (f64::from(k) + 1.0) * INV24;
            let got = f64::from(ln_unit(u as f32));
            worst.0 = worst.0.max((got - u.ln()).abs() / u.ln().abs().max(1.0));
        }
        for k in 0..1u32 << 20 {
            let u = f64::from(k) / f64::from(1u32 << 20);
            let (s, c) = sin_cos_turn(u as f32);
            let a = std::f64::consts::TAU * u;
            worst.1 = worst
                .1
                .max((f64::from(s) - a.sin()).abs())
                .max((f64::from(c) - a.cos()).abs());
        }
        assert!(worst.0 <= 2.4e-7 && worst.1 <= 2.4e-7, "{worst:?}");
    }

    /// 10⁶ normals from `fill_local` have the moments of N(0, 1) within 5
    /// standard errors (mean: se 1e-3; variance: se √2·1e-3; fourth moment:
    /// se √96·1e-3), and the tails are where they should be: the fraction
    /// beyond 3 is 0.0027 (se 5e-5) within 5 se.
    #[test]
    fn normals_have_standard_moments() {
        let (len, groups) = (1000usize, 250u32);
        let mut out = vec![0.0; 4 * len];
        let (mut s1, mut s2, mut s4, mut tail, mut count) = (0.0, 0.0, 0.0, 0.0, 0.0f64);
        for g in 0..groups {
            fill_local(key(2024), 7, g, 0, &mut out);
            for &e in &out {
                s1 += e;
                s2 += e * e;
                s4 += e * e * e * e;
                tail += f64::from(u8::from(e.abs() > 3.0));
                count += 1.0;
            }
        }
        let se = count.recip().sqrt();
        let (mean, var, m4, tail) = (s1 / count, s2 / count, s4 / count, tail / count);
        assert!(mean.abs() < 5.0 * se, "mean {mean}");
        assert!((var - 1.0).abs() < 5.0 * 2f64.sqrt() * se, "variance {var}");
        assert!(
            (m4 - 3.0).abs() < 5.0 * 96f64.sqrt() * se,
            "fourth moment {m4}"
        );
        let p = 0.002_699_796;
        assert!(
            (tail - p).abs() < 5.0 * (p * (1.0 - p) / count).sqrt(),
            "P(|ε| > 3) = {tail}"
        );
    }

    /// Different counters give different normals: groups, steps, keys and
    /// observations are separate streams (no two of these rows agree
    /// anywhere), and the θ draws are not the local ones.
    #[test]
    fn streams_are_distinct() {
        let mut rows = Vec::new();
        for (k, step, group, start) in [
            (1, 1, 0, 0),
            (1, 1, 1, 0),
            (1, 2, 0, 0),
            (2, 1, 0, 0),
            (1, 1, 0, 1),
        ] {
            let mut out = vec![0.0; 4 * 64];
            fill_local(key(k), step, group, start, &mut out);
            rows.push(out);
        }
        for i in 0..rows.len() {
            for j in 0..i {
                assert!(
                    rows[i]
                        .iter()
                        .zip(&rows[j])
                        .all(|(a, b)| a.to_bits() != b.to_bits()),
                    "rows {i} and {j}"
                );
            }
        }
        let theta: Vec<f64> = (0..4).map(|d| theta_normal(key(1), 1, d)).collect();
        assert!(theta.iter().all(|t| !rows[0].contains(t)));
    }
}
