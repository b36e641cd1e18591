//! `cargo run --release -p poisson-lognormal [-- STEPS]`: simulate 300
//! counts, fit the Poisson log-normal model with F-VI and with A-VI (an MLP),
//! and print the ELBOs, q(θ), a few q(z_n), and the A-VI encoder's factors for
//! counts it never saw beside the exact F-VI optimum for them.

use avi_inference::tch::{self, Tensor};
use avi_inference::Fit;
use poisson_lognormal::{fit_avi, fit_fvi, local_optimum, options, PoissonLogNormal};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // libtorch's default is one thread per core, which is slower at this size
    // and collapses when other processes share the cores: choose explicitly.
    tch::set_num_threads(1);
    let steps = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 3_000,
    };
    let (mu, sigma) = (1.0, 0.8);
    let x = PoissonLogNormal::simulate(mu, sigma, 300, 7)?;
    let model = PoissonLogNormal::default();
    let largest = x.iter().cloned().fold(0.0, f64::max);
    println!(
        "300 counts simulated with μ = {mu}, log σ = {:.3}; the largest is {largest}",
        f64::ln(sigma)
    );

    let opts = options(steps, 1954);
    let fvi = fit_fvi(&model, &x, None, &opts)?;
    let avi = fit_avi(&model, &x, 16, &opts)?;
    for (name, f) in [("F-VI", &fvi), ("A-VI (MLP, k = 16)", &avi)] {
        summarise(name, f, &x);
    }

    // The encoder on counts it never saw, against the exact optimum of a free
    // factor for each with θ at q(θ)'s mean. Beyond the largest count of the
    // data the MLP extrapolates, and its factors drift from the optimum.
    let theta = &avi.q_theta.as_ref().ok_or("θ was free")?.mean;
    let new = [0.0, 2.0, 10.0, 40.0, 120.0];
    let q = avi
        .variational
        .predict_local(&Tensor::from_slice(&new))?
        .ok_or("an A-VI fit predicts local factors")?;
    let means = q.mean;
    let sds = q.sd;
    println!("\nnew counts: A-VI q(z) = f(x) against the free factor's optimum at θ = E_q[θ]");
    for ((x, m), s) in new.iter().zip(&means).zip(&sds) {
        let (om, os) = local_optimum(*x, theta[0], theta[1].exp());
        println!("  x = {x:>5}: A-VI N({m:.3}, {s:.3}²)   optimum N({om:.3}, {os:.3}²)");
    }
    Ok(())
}

fn summarise(name: &str, f: &Fit, x: &[f64]) {
    println!(
        "\n{name}: ELBO {:.2} ± {:.2} after {} steps ({:.1} s, {:?})",
        f.elbo, f.elbo_se, f.iterations, f.seconds, f.status
    );
    if let Some(q) = &f.q_theta {
        println!(
            "  q(μ) = N({:.3}, {:.3}²), q(log σ) = N({:.3}, {:.3}²)",
            q.mean[0], q.sd[0], q.mean[1], q.sd[1]
        );
    }
    for (n, x) in x.iter().enumerate().take(4) {
        println!(
            "  x_{n} = {x:>3}: q(z_{n}) = N({:.3}, {:.3}²)",
            f.q_z.mean[n], f.q_z.sd[n]
        );
    }
}
