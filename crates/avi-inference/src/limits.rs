//! What a fit needs before it runs: every size that becomes a tensor
//! dimension or a host vector in its range (so that no conversion to `i64`
//! or product of sizes overflows), and an estimate of its peak memory
//! compared with the memory available, so that a fit too large for the
//! machine is refused with an error naming the setting at fault instead of
//! aborting in an allocation.

use avi_models::{Model, MAX_OBSERVATIONS};
use tch::{Device, Kind, Tensor};

use crate::function::{FunctionConfig, Heads, Output};
use crate::method::{check_window, Edges, MethodConfig};
use crate::options::{Dtype, Engine, FitOptions};
use crate::{InferenceError, Result};

/// Data whose finite values the fit's dtype cannot hold (|x| beyond f32's
/// largest value in an f32 fit) are refused, naming the first such value:
/// converted, they would read as infinite and be reported as "not
/// finite" although the data hold a number. Non-finite values are left to
/// the model's own check. One reduction over `x`, before the fit.
pub fn check_representable(x: &Tensor, dtype: Dtype) -> Result<()> {
    if dtype != Dtype::F32 || x.kind() != Kind::Double || x.numel() == 0 {
        return Ok(());
    }
    let limit = f64::from(f32::MAX);
    let flat = x.flatten(0, -1);
    let beyond = flat.abs().gt(limit).logical_and(&flat.isfinite());
    if beyond.any().int64_value(&[]) == 0 {
        return Ok(());
    }
    let i = beyond
        .to_kind(Kind::Int64)
        .argmax(0, false)
        .int64_value(&[]);
    Err(InferenceError::config(
        "data",
        format!(
            "value {i} of x ({:e}) overflows f32 (largest {:e}): fit with dtype f64",
            flat.double_value(&[i]),
            f32::MAX
        ),
    ))
}

/// Elements per chunk of draws in the final ELBO evaluation
/// ([`crate::evaluate_elbo`] draws `4·10⁶ / (N·L)` draws at a time, at
/// least one).
pub(crate) const EVAL_CHUNK_ELEMENTS: usize = 4_000_000;

/// One part of a fit's memory: the bytes, the setting that drives it and
/// how it is made up.
#[derive(Debug, Clone)]
struct Part {
    field: &'static str,
    bytes: u128,
    what: String,
}

/// The parts of the peak memory of a fit, in bytes.
#[derive(Debug, Clone)]
struct Estimate {
    /// Held for the whole fit: parameters and their Adam state, data,
    /// A-VI inputs, the trace.
    resident: Vec<Part>,
    /// The larger of the two phases (a training step with its autograd
    /// graph, the final evaluation) is added to `resident`.
    step: Part,
    eval: Part,
}

impl Estimate {
    fn total(&self) -> u128 {
        let resident = self
            .resident
            .iter()
            .fold(0u128, |acc, p| acc.saturating_add(p.bytes));
        resident.saturating_add(self.step.bytes.max(self.eval.bytes))
    }

    /// The largest part of the peak (the phase that counts included).
    fn largest(&self) -> &Part {
        let phase = if self.step.bytes >= self.eval.bytes {
            &self.step
        } else {
            &self.eval
        };
        self.resident
            .iter()
            .chain(std::iter::once(phase))
            .max_by_key(|p| p.bytes)
            .unwrap_or(phase)
    }
}

/// `a × b × …` in u128, saturating (inputs are `usize`, so a product of
/// three never saturates; more may).
fn prod(factors: &[usize]) -> u128 {
    factors
        .iter()
        .fold(1u128, |acc, &f| acc.saturating_mul(f as u128))
}

/// Learned scalars of an inference function with `input_dim` inputs and
/// `out` outputs per observation.
fn function_params(function: &FunctionConfig, input_dim: usize, output: Output) -> u128 {
    let out = output.width();
    match function {
        FunctionConfig::Poly { degree } => (*degree as u128).saturating_add(2),
        FunctionConfig::Mlp {
            width,
            depth,
            heads,
            ..
        } => {
            let separate = *heads == Heads::Separate && matches!(output, Output::Gaussian { .. });
            let trunks: u128 = if separate { 2 } else { 1 };
            let trunk = prod(&[input_dim, *width])
                .saturating_add(*width as u128)
                .saturating_add(
                    prod(&[depth.saturating_sub(1), *width, *width])
                        .saturating_add(prod(&[depth.saturating_sub(1), *width])),
                );
            trunks
                .saturating_mul(trunk)
                .saturating_add(prod(&[out, *width]))
                .saturating_add(out as u128)
        }
    }
}

/// The memory parts of a fit of `runs` seeds at once (1 but for
/// batched seeds, [`crate::FitRequest::seeds`]).
fn estimate(
    model: &dyn Model,
    n: usize,
    method: &MethodConfig,
    opts: &FitOptions,
    runs: usize,
) -> Estimate {
    // A semi-amortized method's family is A-VI's; its step keeps more
    // graphs (below), and `switch_at` adds F-VI's free factors.
    let refine = method.refine().copied();
    let switches = method.switch_at().is_some();
    let encoder = method.encoder();
    let method = &encoder;
    let elem: usize = match opts.dtype {
        Dtype::F32 => 4,
        Dtype::F64 => 8,
    };
    let output = match model.local_states() {
        Some(states) => Output::Categorical { states },
        None => Output::Gaussian {
            dim: model.local_dim(),
        },
    };
    // A Markov structure: the method inside, with chain rows.
    let (method, output) = match method {
        MethodConfig::Markov(inner) => (inner.as_ref(), Output::Markov),
        m => (m, output),
    };
    let (l, w) = (model.local_dim(), output.width());
    let d = model.theta_dim();
    let dx = model.observation_dim();
    let work = model.work_per_observation();
    let batch = opts.batch_size.unwrap_or(n).min(n);
    let m = opts.draws;
    // Refinement on mini-batches draws z for the batch's rows only.
    let rows = if refine.is_some() { batch } else { n };
    // Graphs alive at once in one step: the K + 1 ELBO evaluations that
    // `through` differentiates through (second order: twice each), or the
    // refined and the encoder's ELBO of a detached refinement.
    let graphs: usize = match refine {
        Some(r) if r.through => r.steps.saturating_add(1).saturating_mul(2),
        Some(_) => 2,
        None => 1,
    };

    // Parameters: q(θ), the local family; each with its gradient and
    // Adam's two moments (4 copies).
    let theta = prod(&[2, d]);
    let (local, local_what, local_field, fn_acts) = match method {
        MethodConfig::Fvi => (
            prod(&[n, w]),
            format!("N = {n} × {w} local parameters"),
            "data",
            0,
        ),
        MethodConfig::Const | MethodConfig::Markov(_) => (w as u128, String::new(), "method", 0),
        MethodConfig::Semi { .. } => unreachable!("encoder() is not semi-amortized"),
        MethodConfig::Avi {
            function,
            window,
            edges,
            ..
        } => {
            let span = window[0].saturating_add(window[1]);
            let input_dim = dx.saturating_mul(span.saturating_add(1));
            let edge_rows = match edges {
                Edges::Pad => 0,
                Edges::Free => prod(&[span, w]),
            };
            let (what, field, acts) = match function {
                FunctionConfig::Mlp {
                    width,
                    depth,
                    heads,
                    ..
                } => {
                    let trunks = if *heads == Heads::Separate { 2 } else { 1 };
                    // Forward values kept for the backward pass and their
                    // gradients: 3 × N × width per hidden layer and trunk.
                    (
                        format!(
                            "an MLP of width {width}, depth {depth} on {input_dim} inputs, \
                             and its activations on N = {n}"
                        ),
                        "method.fn.width",
                        prod(&[3, trunks, *depth, n, *width]),
                    )
                }
                FunctionConfig::Poly { .. } => (String::new(), "method", 0),
            };
            // The inputs (and the padded series they are cut from).
            let inputs = prod(&[2, n.saturating_add(span), input_dim]);
            (
                function_params(function, input_dim, output).saturating_add(edge_rows),
                what,
                field,
                acts.saturating_add(inputs),
            )
        }
    };
    let params = prod(&[4, runs, elem]).saturating_mul(theta.saturating_add(local));
    let mut resident = vec![
        Part {
            field: local_field,
            bytes: params,
            what: if local_what.is_empty() {
                format!("{} variational parameters", theta.saturating_add(local))
            } else {
                local_what
            },
        },
        Part {
            field: "data",
            // The data on the host (f64) and on the device (the fit's dtype).
            bytes: prod(&[n, dx, 8 + elem]),
            what: format!("N = {n} observations of {dx} values"),
        },
        Part {
            // iteration, ELBO, seconds per step, in vectors that may hold
            // twice their length while they grow.
            field: "steps",
            bytes: prod(&[opts.steps, runs, 48]),
            what: format!("a trace of {} steps", opts.steps),
        },
    ];
    if fn_acts > 0 {
        resident.push(Part {
            field: local_field,
            bytes: fn_acts.saturating_mul(elem as u128),
            what: format!("the inference function's inputs and activations on N = {n}"),
        });
    }

    // One step: the draws of z (ε, z, ε², the gradient of z, two model
    // terms: 6 × M × N × L), the likelihood's intermediates and their
    // gradients on the batch (3 × M × B × work), θ's draws (4 × M × D).
    let fused = opts.engine == Engine::Fused;
    let step_elems = match output {
        Output::Gaussian { .. } if !fused => prod(&[6, m, rows, l])
            .saturating_add(prod(&[3, m, batch, work]))
            .saturating_add(prod(&[4, m, d])),
        // The chain's scan keeps 3 [M, N] tensors per doubling round.
        Output::Markov => prod(&[6 + 3 * (usize::BITS - n.leading_zeros()) as usize, m, n])
            .saturating_add(prod(&[3, m, batch, work]))
            .saturating_add(prod(&[4, m, d])),
        // The fused engine keeps no draw tensors; discrete local factors are
        // enumerated (only θ is drawn).
        _ => prod(&[4, m, d]).saturating_add(prod(&[4, n, w])),
    };
    let step = Part {
        field: if graphs > 2 {
            "method.refine.steps"
        } else {
            "draws"
        },
        bytes: step_elems.saturating_mul(prod(&[runs, elem, graphs])),
        what: format!(
            "{m} draws per step × N = {n} × {} values per draw and observation{}",
            6usize
                .saturating_mul(l)
                .saturating_add(3usize.saturating_mul(work)),
            if graphs > 1 {
                format!(", {graphs} graphs at once (semi-amortized refinement)")
            } else {
                String::new()
            }
        ),
    };
    if switches {
        resident.push(Part {
            field: "data",
            bytes: prod(&[4, runs, elem, n, w]),
            what: format!("after the switch, F-VI's N = {n} × {w} local parameters"),
        });
    }

    // The final evaluation, in chunks of draws, without gradients (ε, z and
    // two model terms: 4 × N × L, and 2 × N × work per draw), plus every
    // draw's value on the host (f64, and the copy it is read into).
    let per_draw = match output {
        Output::Gaussian { .. } | Output::Markov => n.saturating_mul(l).max(1),
        Output::Categorical { .. } => 1,
    };
    let chunk = (EVAL_CHUNK_ELEMENTS / per_draw).clamp(1, opts.eval_draws.max(1));
    let eval_elems = match output {
        Output::Gaussian { .. } | Output::Markov => prod(&[chunk, 4, n, l])
            .saturating_add(prod(&[chunk, 2, n, work]))
            .saturating_add(prod(&[chunk, 2, d])),
        Output::Categorical { .. } => prod(&[chunk, 2, d]).saturating_add(prod(&[4, n, w])),
    };
    let eval = Part {
        field: "eval_draws",
        bytes: eval_elems
            .saturating_mul(elem as u128)
            .saturating_add(prod(&[opts.eval_draws, 16])),
        what: format!(
            "{} evaluation draws, {chunk} at a time, × N = {n} × {} values per draw and observation",
            opts.eval_draws,
            4usize.saturating_mul(l).saturating_add(2usize.saturating_mul(work))
        ),
    };
    Estimate {
        resident,
        step,
        eval,
    }
}

/// A conservative estimate, in bytes, of the peak memory of a fit of
/// `method` to N = `n` observations under `model` with `opts` on the
/// libtorch engine: the variational parameters (the inference function's
/// weights included) with their gradients and Adam moments; the data; an
/// A-VI function's inputs and activations; the trace; and the larger of one
/// training step (the `[draws, N, L]` draw tensors, their gradients and the
/// model's intermediates on the batch, `draws × B ×`
/// [`Model::work_per_observation`]) and the final evaluation (chunks of
/// `eval_draws` as [`crate::evaluate_elbo`] takes them, and every draw's
/// value on the host). Sizes beyond `u64` saturate at `u64::MAX`.
pub fn memory_estimate(
    model: &dyn Model,
    n: usize,
    method: &MethodConfig,
    opts: &FitOptions,
) -> u64 {
    u64::try_from(estimate(model, n, method, opts, 1).total()).unwrap_or(u64::MAX)
}

/// The memory a fit on `device` may use, in bytes: on the CPU,
/// `MemAvailable` of `/proc/meminfo`; `None` (no memory check) where that
/// cannot be read, and on other devices (the bindings have no query for a
/// GPU's free memory).
pub fn available_memory(device: Device) -> Option<u64> {
    if device != Device::Cpu {
        return None;
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

/// `MemAvailable` of `/proc/meminfo` text, in bytes.
fn parse_mem_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// Bytes in GiB, for messages.
fn gib(bytes: u128) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// [`check_fit`] against the CPU's available memory ([`available_memory`]).
///
/// Checks, before anything is allocated, every size of a fit of `method`
/// to N = `n` observations under `model` with `opts`: the options
/// ([`FitOptions::check`]); 1 ≤ N ≤ [`MAX_OBSERVATIONS`]; `batch_size` ≤ N;
/// an A-VI window shorter than the data (no overflow in `before + after`)
/// and its function's settings (polynomial degree ≤ 10; MLP width
/// 1..=65,536 and depth 1..=16); and that [`memory_estimate`] does not
/// exceed the memory available. Errors name the field at fault.
pub fn check_fit(
    model: &dyn Model,
    n: usize,
    method: &MethodConfig,
    opts: &FitOptions,
) -> Result<()> {
    check_fit_within(model, n, method, opts, available_memory(Device::Cpu))
}

/// [`check_fit`] with the memory limit given: `available` bytes, or `None`
/// for no memory check (ranges only).
pub fn check_fit_within(
    model: &dyn Model,
    n: usize,
    method: &MethodConfig,
    opts: &FitOptions,
    available: Option<u64>,
) -> Result<()> {
    check_runs(model, n, method, opts, 1, available)
}

/// [`check_fit_within`] for `runs` seeds fitted at once.
pub(crate) fn check_runs(
    model: &dyn Model,
    n: usize,
    method: &MethodConfig,
    opts: &FitOptions,
    runs: usize,
    available: Option<u64>,
) -> Result<()> {
    // A structure the model cannot take is a config error, found here
    // (before any allocation, and by `avi fit --check`).
    if matches!(method, MethodConfig::Markov(_)) {
        crate::markov::check_model(model)?;
    }
    opts.check()?;
    if n == 0 {
        return Err(InferenceError::config("data", "the data set is empty"));
    }
    if n > MAX_OBSERVATIONS {
        return Err(InferenceError::config(
            "data",
            format!("N = {n} observations is more than the largest supported, {MAX_OBSERVATIONS}"),
        ));
    }
    if let Some(b) = opts.batch_size {
        if b > n {
            return Err(InferenceError::config(
                "batch_size",
                format!("{b} is larger than the data (N = {n})"),
            ));
        }
    }
    if let MethodConfig::Avi {
        function, window, ..
    } = &method.encoder()
    {
        check_window(*window, n)?;
        // before + after < N ≤ 2³⁰: no overflow below.
        let input_dim = model
            .observation_dim()
            .checked_mul(window[0] + window[1] + 1)
            .ok_or_else(|| {
                InferenceError::config("method.window", "the window's inputs overflow")
            })?;
        let output = match model.local_states() {
            Some(states) => Output::Categorical { states },
            None => Output::Gaussian {
                dim: model.local_dim(),
            },
        };
        function.check(input_dim, output)?;
    }
    let Some(available) = available else {
        return Ok(());
    };
    let estimate = estimate(model, n, method, opts, runs);
    let total = estimate.total();
    if total > available as u128 {
        let part = estimate.largest();
        return Err(InferenceError::config(
            part.field,
            format!(
                "the fit would need about {} (the largest part, {}: {}), {} is available",
                gib(total),
                gib(part.bytes),
                part.what,
                gib(available as u128)
            ),
        ));
    }
    Ok(())
}

/// [`crate::check_fit_within`] for the data `x` (N = its first dimension)
/// against the memory available on `device`, and
/// [`crate::check_representable`] for its values, then the model's own
/// check of the data ([`Model::check_data`]).
pub(crate) fn check_data_size(
    model: &dyn Model,
    x: &Tensor,
    method: &MethodConfig,
    opts: &FitOptions,
    device: Device,
) -> Result<()> {
    let Some(&n) = x.size().first() else {
        model.check_data(x)?;
        return Err(InferenceError::config(
            "data",
            "the data have no observations",
        ));
    };
    let n = usize::try_from(n).unwrap_or(0);
    check_fit_within(model, n, method, opts, available_memory(device))?;
    check_representable(x, opts.dtype)?;
    // The model's own data check, for every engine (the fused ones read
    // the data as a flat host vector).
    model.check_data(x)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::function::Activation;
    use crate::method::Refine;
    use crate::options::{MAX_DRAWS, MAX_STEPS};
    use avi_models::{BnnModel, LinearModel};

    const GIB: u64 = 1 << 30;

    fn mlp(width: usize, window: [usize; 2]) -> MethodConfig {
        MethodConfig::Avi {
            function: FunctionConfig::Mlp {
                width,
                depth: 2,
                activation: Activation::Relu,
                heads: Heads::Shared,
            },
            standardize: true,
            window,
            edges: Edges::Pad,
        }
    }

    fn refusal(
        model: &dyn Model,
        n: usize,
        method: &MethodConfig,
        opts: &FitOptions,
        available: Option<u64>,
    ) -> (String, String) {
        match check_fit_within(model, n, method, opts, available) {
            Err(e @ InferenceError::InvalidConfig { field, .. }) => {
                eprintln!("{e}");
                (field.to_string(), e.to_string())
            }
            other => panic!("expected an invalid setting, got {other:?}"),
        }
    }

    /// Sizes that overflow an `i64` or a `usize` product are refused with
    /// the field at fault, whatever the memory (before: a wrapped
    /// `batch_size as i64`, an overflowing window sum, a capacity overflow).
    #[test]
    fn sizes_beyond_their_ranges_are_refused() {
        let linear = LinearModel::new(1.155, 2.43).unwrap();
        let bnn = BnnModel::new(2, 8, 16).unwrap();
        let opts = FitOptions::default();
        let ok = |m: &dyn Model, n, method: &MethodConfig, o: &FitOptions| {
            check_fit_within(m, n, method, o, None)
        };
        assert!(ok(&linear, 1000, &MethodConfig::Fvi, &opts).is_ok());
        assert_eq!(
            refusal(&linear, 0, &MethodConfig::Fvi, &opts, None).0,
            "data"
        );
        assert_eq!(
            refusal(
                &linear,
                MAX_OBSERVATIONS + 1,
                &MethodConfig::Fvi,
                &opts,
                None
            )
            .0,
            "data"
        );
        assert_eq!(
            refusal(&linear, usize::MAX, &MethodConfig::Fvi, &opts, None).0,
            "data"
        );
        for b in [1 << 63, usize::MAX, 1001] {
            let o = FitOptions {
                batch_size: Some(b),
                ..opts.clone()
            };
            assert_eq!(
                refusal(&bnn, 1000, &MethodConfig::Fvi, &o, None).0,
                "batch_size"
            );
        }
        let o = FitOptions {
            batch_size: Some(1000),
            ..opts.clone()
        };
        assert!(ok(&bnn, 1000, &MethodConfig::Fvi, &o).is_ok());
        for window in [[usize::MAX, 1], [500, 500]] {
            assert_eq!(
                refusal(&linear, 1000, &mlp(8, window), &opts, None).0,
                "method.window"
            );
        }
        assert!(ok(&linear, 1000, &mlp(8, [499, 500]), &opts).is_ok());
        for width in [0, 65_537, usize::MAX] {
            assert_eq!(
                refusal(&linear, 1000, &mlp(width, [0, 0]), &opts, None).0,
                "method.fn.width"
            );
        }
        let poly = MethodConfig::Avi {
            function: FunctionConfig::Poly { degree: 11 },
            standardize: true,
            window: [0, 0],
            edges: Edges::Pad,
        };
        assert_eq!(
            refusal(&linear, 1000, &poly, &opts, None).0,
            "method.fn.degree"
        );
        let o = FitOptions {
            steps: 1 << 40,
            ..opts.clone()
        };
        assert_eq!(
            refusal(&linear, 1000, &MethodConfig::Fvi, &o, None).0,
            "steps"
        );
    }

    /// The memory check names the setting that drives the estimate past
    /// the limit, and accepts the same fit under a larger limit.
    #[test]
    fn fits_beyond_the_memory_limit_are_refused() {
        let linear = LinearModel::new(1.155, 2.43).unwrap();
        let fvi = MethodConfig::Fvi;
        let opts = FitOptions::default();
        // The paper's linear fit: N = 10⁴, 100 draws (about 50 MB).
        let small = memory_estimate(&linear, 10_000, &fvi, &opts);
        assert!((10_000_000..200_000_000).contains(&small), "{small}");
        assert!(check_fit_within(&linear, 10_000, &fvi, &opts, Some(GIB)).is_ok());
        // 10⁶ draws per step of 10⁴ observations: about 400 GB.
        let many = FitOptions {
            draws: 1_000_000,
            ..opts.clone()
        };
        let (field, text) = refusal(&linear, 10_000, &fvi, &many, Some(16 * GIB));
        assert_eq!(field, "draws");
        assert!(
            text.contains("GiB") && text.contains("16.0 GiB is available"),
            "{text}"
        );
        // A trace of 10⁹ steps: 48 GB.
        let long = FitOptions {
            steps: MAX_STEPS,
            ..opts.clone()
        };
        assert_eq!(
            refusal(&linear, 100, &fvi, &long, Some(16 * GIB)).0,
            "steps"
        );
        // 10⁸ evaluation draws of 10⁶ observations: chunks of 4 draws,
        // every draw's value on the host (1.6 GB).
        let evals = FitOptions {
            eval_draws: MAX_DRAWS,
            draws: 1,
            ..opts.clone()
        };
        assert_eq!(
            refusal(&linear, 1_000_000, &fvi, &evals, Some(GIB)).0,
            "eval_draws"
        );
        // The documented largest MLP width: 65,536² weights per hidden
        // layer, 17 GB in f32, four copies with the gradient and Adam.
        let wide = mlp(65_536, [0, 0]);
        let bytes = memory_estimate(&linear, 1000, &wide, &opts);
        assert!(bytes > 4 * 65_536 * 65_536 * 4, "{bytes}");
        let (field, _) = refusal(&linear, 1000, &wide, &opts, Some(32 * GIB));
        assert_eq!(field, "method.fn.width");
        // BNN decoder intermediates count: 1,000 images of 784 pixels.
        let bnn = BnnModel::default();
        let b = memory_estimate(&bnn, 1000, &fvi, &opts);
        assert!(b > 100 * 1000 * 784 * 4, "{b}");
    }

    /// A semi-amortized step keeps more graphs than A-VI's: 2(K + 1) with
    /// `through` (the K + 1 ELBO evaluations and their second-order
    /// gradients), 2 detached; refinement on mini-batches draws only the
    /// batch's rows; `switch_at` adds F-VI's free factors (4 copies of N × W).
    #[test]
    fn semi_amortized_steps_count_their_graphs() {
        let linear = LinearModel::new(1.155, 2.43).unwrap();
        let opts = FitOptions {
            draws: 100,
            eval_draws: 10,
            ..FitOptions::default()
        };
        let n = 100_000;
        let semi = |refine: Option<Refine>, switch_at: Option<usize>| MethodConfig::Semi {
            function: FunctionConfig::Poly { degree: 1 },
            standardize: true,
            window: [0, 0],
            edges: Edges::Pad,
            refine,
            switch_at,
        };
        let refine = |steps, through| {
            Some(Refine {
                steps,
                lr: 0.1,
                through,
                max_step: None,
            })
        };
        let est = |m: &MethodConfig, o: &FitOptions| estimate(&linear, n, m, o, 1);
        let avi = est(&semi(None, Some(10)).encoder(), &opts).step.bytes;
        let through = est(&semi(refine(20, true), None), &opts).step.bytes;
        let detached = est(&semi(refine(20, false), None), &opts).step.bytes;
        assert_eq!(through, 42 * avi);
        assert_eq!(detached, 2 * avi);
        let e = est(&semi(refine(20, true), None), &opts);
        assert_eq!(e.largest().field, "method.refine.steps");
        let batched = FitOptions {
            batch_size: Some(n / 10),
            ..opts.clone()
        };
        let b = est(&semi(refine(20, true), None), &batched).step.bytes;
        assert!(b * 9 < through && b * 11 > through, "{b} vs {through}");
        let plain = est(&semi(None, Some(10)).encoder(), &opts).resident;
        let switch = est(&semi(None, Some(10)), &opts).resident;
        let sum = |parts: &[Part]| parts.iter().map(|p| p.bytes).sum::<u128>();
        assert_eq!(sum(&switch) - sum(&plain), 4 * 4 * n as u128 * 2);
    }

    /// The estimate takes unchecked sizes: at their extremes it saturates
    /// (before: an overflowing sum of its parts for a window of 2⁶⁴ − 1).
    #[test]
    fn the_estimate_saturates_at_extreme_sizes() {
        let linear = LinearModel::new(1.155, 2.43).unwrap();
        let huge = FitOptions {
            steps: usize::MAX,
            draws: usize::MAX,
            eval_draws: usize::MAX,
            batch_size: Some(usize::MAX),
            ..FitOptions::default()
        };
        let wide = MethodConfig::Avi {
            function: FunctionConfig::Mlp {
                width: usize::MAX,
                depth: usize::MAX,
                activation: Activation::Relu,
                heads: Heads::Separate,
            },
            standardize: true,
            window: [usize::MAX, usize::MAX],
            edges: Edges::Free,
        };
        for method in [MethodConfig::Fvi, MethodConfig::Const, wide] {
            assert_eq!(
                memory_estimate(&linear, usize::MAX, &method, &huge),
                u64::MAX
            );
        }
    }

    #[test]
    fn reads_mem_available() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   22000000 kB\n";
        assert_eq!(parse_mem_available(text), Some(22_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert!(available_memory(Device::Cpu).is_some_and(|m| m > 0));
    }
}
