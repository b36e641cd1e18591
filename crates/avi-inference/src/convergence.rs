//! The convergence metric of the paper's experiments (digest §4.1.1), with
//! the authors' NaN bug fixed: a non-finite window never counts as
//! converged.

/// Mean of `values[c − w .. c + w]` (half-open, 2w values), or `None` when
/// the window leaves the slice.
pub fn window_mean(values: &[f64], centre: usize, half_width: usize) -> Option<f64> {
    let lo = centre.checked_sub(half_width)?;
    let hi = centre + half_width;
    if hi > values.len() || hi == lo {
        return None;
    }
    Some(values[lo..hi].iter().sum::<f64>() / (hi - lo) as f64)
}

/// The first checkpoint `c ∈ {20, 30, 40, …}` whose window mean of `elbo`
/// (half width `half_width`, 10 in the paper) lies within
/// `rel_tol · |target|` of `target`, as a 0-based index into `elbo`, or
/// `None` if no window does. A window containing a non-finite value is
/// never within tolerance.
pub fn first_within(elbo: &[f64], target: f64, rel_tol: f64, half_width: usize) -> Option<usize> {
    let mut c = 20usize.max(half_width);
    while let Some(m) = window_mean(elbo, c, half_width) {
        if m.is_finite() && (m - target).abs() <= rel_tol * target.abs() {
            return Some(c);
        }
        c += 10;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_first_window() {
        let mut v = vec![-200.0; 100];
        v.extend(vec![-100.5; 100]);
        let c = first_within(&v, -100.0, 0.01, 10).unwrap();
        assert_eq!(c, 110);
    }

    #[test]
    fn nan_is_never_converged() {
        let v = vec![f64::NAN; 200];
        assert_eq!(first_within(&v, -100.0, 0.01, 10), None);
    }

    #[test]
    fn window_bounds() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(window_mean(&v, 2, 1), Some(2.5));
        assert_eq!(window_mean(&v, 0, 1), None);
        assert_eq!(window_mean(&v, 3, 2), None);
    }
}
