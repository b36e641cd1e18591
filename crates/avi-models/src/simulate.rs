//! What every shipped model offers beyond its log joint, with one signature
//! for all of them: simulating a data set ([`Simulate`]) and, where one is
//! known, a reference solution of mean-field Gaussian VI
//! ([`ExactReference`]: closed form, exact posterior, or CAVI).
//!
//! Each model keeps its own inherent methods (`LinearModel::simulate` takes
//! θ as an `Option<f64>`, `SawModel::fvi_optimum` a fixed θ as an
//! `Option<f64>`, …); these traits are the uniform view a program that
//! handles any model (the `avi` binary) uses.

use crate::{
    hmm_reference::mean_field_cavi, mixture_reference::log_marginal_given_means, BnnModel,
    DiscreteHmm, GaussianHmm, GaussianReference, LinearModel, MixtureModel, Model, ModelError,
    NonlinearModel, Result, SawModel,
};

/// Simulating data from a model with a seed.
pub trait Simulate {
    /// `n` observations simulated with `seed`, with θ drawn from its prior
    /// unless given (then it has [`Model::theta_dim`] values). Vector
    /// observations are returned row-major, `n ×` [`Simulate::vector_dim`]
    /// values.
    fn simulate(&self, n: usize, seed: u64, theta: Option<&[f64]>) -> Result<Vec<f64>>;

    /// The number of values of one observation when observations are
    /// vectors (data `[N, d_x]`); `None` (the default) for scalar
    /// observations (data `[N]`).
    fn vector_dim(&self) -> Option<usize> {
        None
    }
}

/// A reference value of the optimal mean-field ELBO, and what it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReferenceElbo {
    /// The ELBO.
    pub elbo: f64,
    /// What it is, in words (`"closed-form optimal mean-field ELBO"`).
    pub what: &'static str,
}

/// What a closed-form optimum's ELBO is called.
pub const CLOSED_FORM: &str = "closed-form optimal mean-field ELBO";

/// Reference solutions of mean-field Gaussian VI (F-VI) for a data set `x`
/// (row-major for vector observations), with θ known when `fixed_theta` is
/// given. Every method defaults to "none known".
pub trait ExactReference {
    /// The closed-form F-VI optimum (means, sds and ELBO), when the model has
    /// one for this case.
    fn fvi_reference(
        &self,
        _x: &[f64],
        _fixed_theta: Option<&[f64]>,
    ) -> Result<Option<GaussianReference>> {
        Ok(None)
    }

    /// The optimal F-VI ELBO when it is known exactly without fitting: by
    /// default the closed form's ([`ExactReference::fvi_reference`]).
    fn reference_elbo(
        &self,
        x: &[f64],
        fixed_theta: Option<&[f64]>,
    ) -> Result<Option<ReferenceElbo>> {
        Ok(self.fvi_reference(x, fixed_theta)?.map(|r| ReferenceElbo {
            elbo: r.elbo,
            what: CLOSED_FORM,
        }))
    }

    /// A reference found by iterating to convergence (CAVI), costlier than
    /// [`ExactReference::reference_elbo`]; `None` by default.
    fn iterated_reference(
        &self,
        _x: &[f64],
        _fixed_theta: Option<&[f64]>,
    ) -> Result<Option<ReferenceElbo>> {
        Ok(None)
    }
}

/// A scalar θ from a slice: `None` stays `None`, one value is θ, any other
/// length is an error naming the model.
fn scalar_theta(model: &dyn Model, theta: Option<&[f64]>) -> Result<Option<f64>> {
    match theta {
        None => Ok(None),
        Some([t]) => Ok(Some(*t)),
        Some(t) => Err(ModelError::InvalidData(format!(
            "the {} model's θ has 1 value, got {}",
            model.name(),
            t.len()
        ))),
    }
}

/// The first value of a fixed θ (the scalar models' θ).
fn first(fixed_theta: Option<&[f64]>) -> Option<f64> {
    fixed_theta.and_then(|t| t.first().copied())
}

macro_rules! scalar_simulate {
    ($($model:ty),*) => {$(
        impl Simulate for $model {
            fn simulate(&self, n: usize, seed: u64, theta: Option<&[f64]>) -> Result<Vec<f64>> {
                <$model>::simulate(self, n, seed, scalar_theta(self, theta)?)
            }
        }
    )*};
}
scalar_simulate!(LinearModel, NonlinearModel, SawModel, GaussianHmm);

impl Simulate for MixtureModel {
    fn simulate(&self, n: usize, seed: u64, theta: Option<&[f64]>) -> Result<Vec<f64>> {
        MixtureModel::simulate(self, n, seed, theta)
    }

    fn vector_dim(&self) -> Option<usize> {
        Some(self.dim())
    }
}

impl Simulate for BnnModel {
    fn simulate(&self, n: usize, seed: u64, theta: Option<&[f64]>) -> Result<Vec<f64>> {
        BnnModel::simulate(self, n, seed, theta)
    }

    fn vector_dim(&self) -> Option<usize> {
        Some(self.pixels())
    }
}

impl Simulate for DiscreteHmm {
    fn simulate(&self, n: usize, seed: u64, theta: Option<&[f64]>) -> Result<Vec<f64>> {
        DiscreteHmm::simulate(self, n, seed, theta)
    }
}

impl ExactReference for LinearModel {
    /// The closed form with θ unknown (none with θ fixed).
    fn fvi_reference(
        &self,
        x: &[f64],
        fixed_theta: Option<&[f64]>,
    ) -> Result<Option<GaussianReference>> {
        match first(fixed_theta) {
            None => Ok(Some(self.fvi_optimum(x)?)),
            Some(_) => Ok(None),
        }
    }
}

impl ExactReference for SawModel {
    fn fvi_reference(
        &self,
        x: &[f64],
        fixed_theta: Option<&[f64]>,
    ) -> Result<Option<GaussianReference>> {
        Ok(Some(self.fvi_optimum(x, first(fixed_theta))?))
    }
}

impl ExactReference for GaussianHmm {
    fn fvi_reference(
        &self,
        x: &[f64],
        fixed_theta: Option<&[f64]>,
    ) -> Result<Option<GaussianReference>> {
        Ok(Some(self.fvi_optimum(x, first(fixed_theta))?))
    }
}

impl ExactReference for MixtureModel {
    /// With the means fixed the exact posterior of z is factorised, so the
    /// optimal ELBO is `log p(x | θ)`.
    fn reference_elbo(
        &self,
        x: &[f64],
        fixed_theta: Option<&[f64]>,
    ) -> Result<Option<ReferenceElbo>> {
        let Some(mu) = fixed_theta else {
            return Ok(None);
        };
        Ok(Some(ReferenceElbo {
            elbo: log_marginal_given_means(x, self.dim(), mu, self.noise_sd(), &self.weights())?,
            what: "log p(x | θ) (the exact posterior is factorised)",
        }))
    }
}

impl ExactReference for DiscreteHmm {
    /// With the state means fixed: the mean-field CAVI optimum (500 sweeps).
    fn iterated_reference(
        &self,
        x: &[f64],
        fixed_theta: Option<&[f64]>,
    ) -> Result<Option<ReferenceElbo>> {
        let Some(mu) = fixed_theta else {
            return Ok(None);
        };
        let (_, elbo) = mean_field_cavi(
            &self.init(),
            &self.transition(),
            mu,
            self.emission_sd(),
            x,
            500,
        )?;
        Ok(Some(ReferenceElbo {
            elbo,
            what: "mean-field CAVI optimum (500 sweeps)",
        }))
    }
}

impl ExactReference for NonlinearModel {}
impl ExactReference for BnnModel {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trait's simulations are the inherent methods' (the same code
    /// runs; compared exactly), and a scalar model refuses a θ of the
    /// wrong length.
    #[test]
    fn one_signature_for_every_model() {
        let lin = LinearModel::new(1.155, 2.43).unwrap();
        let via_trait = Simulate::simulate(&lin, 20, 3, Some(&[0.5])).unwrap();
        assert_eq!(via_trait, lin.simulate(20, 3, Some(0.5)).unwrap());
        assert!(Simulate::simulate(&lin, 20, 3, Some(&[0.5, 1.0])).is_err());
        assert_eq!(Simulate::vector_dim(&lin), None);
        let mix = MixtureModel::new(2, 3, 5.0, 1.0, None).unwrap();
        assert_eq!(Simulate::vector_dim(&mix), Some(3));
        let x = Simulate::simulate(&mix, 4, 1, None).unwrap();
        assert_eq!(x, mix.simulate(4, 1, None).unwrap());
        assert_eq!(x.len(), 12);
        let saw = SawModel::new(0.75, 0.0).unwrap();
        let xs = saw.simulate(30, 2012, Some(3.4159)).unwrap();
        let r = saw.reference_elbo(&xs, None).unwrap().unwrap();
        assert_eq!(
            r.elbo.to_bits(),
            saw.fvi_optimum(&xs, None).unwrap().elbo.to_bits()
        );
        assert_eq!(r.what, CLOSED_FORM);
        assert!(lin.fvi_reference(&xs, Some(&[0.1])).unwrap().is_none());
        assert!(NonlinearModel::default()
            .reference_elbo(&xs, None)
            .unwrap()
            .is_none());
    }
}
