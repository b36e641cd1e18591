//! Helpers shared by the models' unit tests: compare a `log_joint` and its
//! gradients with a direct-formula implementation.

use tch::Tensor;

use crate::Model;

/// `f(θ, z, x)` summed over draws, and its gradients w.r.t. θ and z.
pub(crate) fn value_and_grads(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    theta: &Tensor,
    z: &Tensor,
    x: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let theta = theta.detach().set_requires_grad(true);
    let z = z.detach().set_requires_grad(true);
    let v = f(&theta, &z, x);
    v.sum(v.kind()).backward();
    (v.detach(), theta.grad(), z.grad())
}

/// Largest |a − b| over largest |b|.
pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

/// Relative errors of the value and of the θ and z gradients of
/// `m.log_joint` against `direct`.
pub(crate) fn compare(
    m: &impl Model,
    direct: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    theta: &Tensor,
    z: &Tensor,
    x: &Tensor,
) -> [f64; 3] {
    let (v1, t1, z1) = value_and_grads(|t, z, x| m.log_joint(t, z, x).unwrap(), theta, z, x);
    let (v0, t0, z0) = value_and_grads(direct, theta, z, x);
    [rel_err(&v1, &v0), rel_err(&t1, &t0), rel_err(&z1, &z0)]
}

/// Largest |Σ_n local_terms + log_prior − log_joint| over |log_joint|, for
/// the check that a model's per-observation terms add up to its log joint.
pub(crate) fn local_terms_error(m: &impl Model, theta: &Tensor, z: &Tensor, x: &Tensor) -> f64 {
    let terms = m.local_terms(theta, z, x).unwrap();
    assert_eq!(terms.size(), [theta.size()[0], x.size()[0]]);
    let total = terms.sum_dim_intlist(1, false, None) + m.log_prior(theta).unwrap();
    rel_err(&total, &m.log_joint(theta, z, x).unwrap())
}
