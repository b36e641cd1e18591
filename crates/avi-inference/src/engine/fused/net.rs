//! A-VI's inference function on the host, in f64, for the fused engine: the
//! polynomial and the MLP of [`crate::function`] evaluated and
//! back-propagated by hand, so that an A-VI step makes no libtorch call.
//!
//! The passes go over the observations in blocks of [`ROWS`] rows with the
//! activations stored feature-major (`[units, rows]`), so every inner loop
//! runs along contiguous rows and vectorises; the backward pass recomputes
//! its block's activations instead of storing all N of them. Weight
//! gradients are sums over rows in [`super::lane_sum`]'s fixed order.

use std::ops::Range;

use tch::Tensor;

use super::{lane_dot, lane_sum};
use crate::family::host_vec;
use crate::function::{Activation, FunctionParts};
use crate::{InferenceError, Result};

/// Rows per block: a block's activations (depth × width × 256 f64, 32 KiB
/// per layer at width 16) stay in cache between the forward and backward
/// halves of a pass.
const ROWS: usize = 256;

/// One parameter tensor of the libtorch function and its place in φ.
#[derive(Debug)]
pub(crate) struct Slot {
    /// The trainable tensor (a shallow clone: writing it writes the
    /// function's own parameter).
    pub(crate) tensor: Tensor,
    /// Its first index in the flat vector.
    pub(crate) start: usize,
}

/// One layer `u ↦ W u + b` with `W` at `w` (row-major `[fan_out, fan_in]`,
/// libtorch's layout) and `b` at `b` in φ.
#[derive(Debug, Clone, Copy)]
struct Layer {
    w: usize,
    b: usize,
    fan_in: usize,
    fan_out: usize,
}

#[derive(Debug)]
enum Shape {
    /// Coefficients a_0..a_d at 0..=d, ξ at d + 1.
    Poly { degree: usize },
    /// Networks in output-column order, each its hidden layers then its
    /// head.
    Mlp {
        activation: Activation,
        nets: Vec<Vec<Layer>>,
    },
}

/// The inference function on the host: its shape, its `[N, I]` inputs and
/// where its parameters sit in a flat vector φ.
#[derive(Debug)]
pub(crate) struct HostNet {
    shape: Shape,
    inputs: Vec<f64>,
    input_dim: usize,
    len: usize,
}

/// Values of one tensor, checked to have `numel` elements.
fn values(t: &Tensor, numel: usize, what: &str) -> Result<Vec<f64>> {
    let v = host_vec(t)?;
    if v.len() != numel {
        return Err(InferenceError::config(
            "fn",
            format!("{what}: {} values where {numel} were expected", v.len()),
        ));
    }
    Ok(v)
}

impl HostNet {
    /// The function of `parts` applied to `inputs` (`[N, I]`): appends its
    /// parameters to `params` (φ then starts at the length `params` had)
    /// and their slots to `slots`. Fails unless the function gives one mean
    /// and one log-sd per row.
    pub(crate) fn new(
        parts: FunctionParts<'_>,
        inputs: &Tensor,
        params: &mut Vec<f64>,
        slots: &mut Vec<Slot>,
    ) -> Result<Self> {
        let size = inputs.size();
        let input_dim = match size.as_slice() {
            [_, i] => *i as usize,
            _ => return Err(InferenceError::config("fn", "inputs must be [N, I]")),
        };
        let inputs = host_vec(inputs)?;
        let base = params.len();
        let mut push = |t: &Tensor, numel: usize, what: &str| -> Result<usize> {
            let at = params.len() - base;
            slots.push(Slot {
                tensor: t.shallow_clone(),
                start: params.len(),
            });
            params.extend(values(t, numel, what)?);
            Ok(at)
        };
        let shape = match parts {
            FunctionParts::Poly {
                coefficients,
                log_sd,
            } => {
                if input_dim != 1 {
                    return Err(InferenceError::config("fn", "a polynomial takes one input"));
                }
                let degree = coefficients.numel().saturating_sub(1);
                push(coefficients, degree + 1, "coefficients")?;
                push(log_sd, 1, "log-sd")?;
                Shape::Poly { degree }
            }
            FunctionParts::Mlp { activation, nets } => {
                let outputs: usize = nets.iter().map(|n| n.head.1.numel()).sum();
                if outputs != 2 || nets.is_empty() {
                    return Err(InferenceError::config(
                        "fn",
                        format!(
                            "the fused engine needs scalar z (2 outputs per row, not {outputs})"
                        ),
                    ));
                }
                let mut shapes = Vec::with_capacity(nets.len());
                for net in nets {
                    let mut layers = Vec::new();
                    let mut fan_in = input_dim;
                    for (w, b) in net.hidden.iter().chain(std::iter::once(&net.head)) {
                        let fan_out = b.numel();
                        let w_at = push(w, fan_out * fan_in, "weight")?;
                        let b_at = push(b, fan_out, "bias")?;
                        layers.push(Layer {
                            w: w_at,
                            b: b_at,
                            fan_in,
                            fan_out,
                        });
                        fan_in = fan_out;
                    }
                    shapes.push(layers);
                }
                Shape::Mlp {
                    activation,
                    nets: shapes,
                }
            }
        };
        Ok(Self {
            shape,
            inputs,
            input_dim,
            len: params.len() - base,
        })
    }

    /// Number of scalars in φ.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Means and log-sds of rows `rows` into `mean` and `log_sd` (one value
    /// per row).
    #[inline(always)]
    pub(crate) fn forward(
        &self,
        phi: &[f64],
        rows: Range<usize>,
        mean: &mut [f64],
        log_sd: &mut [f64],
    ) {
        let mut buf = Buffers::default();
        for start in rows.clone().step_by(ROWS) {
            let end = (start + ROWS).min(rows.end);
            let (at, len) = (start - rows.start, end - start);
            let (m, s) = (&mut mean[at..at + len], &mut log_sd[at..at + len]);
            match &self.shape {
                Shape::Poly { degree } => {
                    let u = &self.inputs[start..end];
                    for (m, u) in m.iter_mut().zip(u) {
                        let mut v = phi[*degree];
                        for k in (0..*degree).rev() {
                            v = v * u + phi[k];
                        }
                        *m = v;
                    }
                    s.fill(phi[degree + 1]);
                }
                Shape::Mlp { activation, nets } => {
                    let mut col = 0;
                    for layers in nets {
                        let out = self.net_forward(phi, layers, *activation, start..end, &mut buf);
                        for (k, row) in out.chunks(len).enumerate() {
                            let dst: &mut [f64] = if col + k == 0 { &mut *m } else { &mut *s };
                            dst.copy_from_slice(row);
                        }
                        col += layers.last().map_or(0, |l| l.fan_out);
                    }
                }
            }
        }
    }

    /// Adds to `grad` (φ's length) the gradient through rows `rows` of a
    /// loss whose gradient with respect to their means and log-sds is
    /// `d_mean` and `d_log_sd`.
    #[inline(always)]
    pub(crate) fn backward(
        &self,
        phi: &[f64],
        rows: Range<usize>,
        d_mean: &[f64],
        d_log_sd: &[f64],
        grad: &mut [f64],
    ) {
        let mut buf = Buffers::default();
        for start in rows.clone().step_by(ROWS) {
            let end = (start + ROWS).min(rows.end);
            let (at, len) = (start - rows.start, end - start);
            let (dm, ds) = (&d_mean[at..at + len], &d_log_sd[at..at + len]);
            match &self.shape {
                Shape::Poly { degree } => {
                    let u = &self.inputs[start..end];
                    // ∂/∂a_k = Σ_n dm_n u_n^k, one power at a time.
                    let mut power = vec![1.0; len];
                    for g in grad.iter_mut().take(degree + 1) {
                        *g += lane_dot(dm, &power);
                        for (p, u) in power.iter_mut().zip(u) {
                            *p *= u;
                        }
                    }
                    grad[degree + 1] += lane_sum(ds);
                }
                Shape::Mlp { activation, nets } => {
                    let mut col = 0;
                    for layers in nets {
                        let outs = layers.last().map_or(0, |l| l.fan_out);
                        let mut d_out = Vec::with_capacity(outs * len);
                        for k in col..col + outs {
                            d_out.extend_from_slice(if k == 0 { dm } else { ds });
                        }
                        self.net_backward(
                            phi,
                            layers,
                            *activation,
                            start..end,
                            &d_out,
                            &mut buf,
                            grad,
                        );
                        col += outs;
                    }
                }
            }
        }
    }

    /// One network's forward pass over a block: fills `buf.pre`/`buf.act`
    /// per layer and returns the head's `[fan_out, len]` outputs.
    #[inline(always)]
    fn net_forward<'b>(
        &self,
        phi: &[f64],
        layers: &[Layer],
        activation: Activation,
        rows: Range<usize>,
        buf: &'b mut Buffers,
    ) -> &'b [f64] {
        let len = rows.len();
        let i_dim = self.input_dim;
        buf.input.clear();
        for i in 0..i_dim {
            buf.input.extend(
                self.inputs[rows.start * i_dim..rows.end * i_dim]
                    .iter()
                    .skip(i)
                    .step_by(i_dim),
            );
        }
        buf.pre.resize_with(layers.len(), Vec::new);
        buf.act.resize_with(layers.len(), Vec::new);
        for (l, layer) in layers.iter().enumerate() {
            let pre = &mut buf.pre[l];
            let prev: &[f64] = if l == 0 { &buf.input } else { &buf.act[l - 1] };
            affine(phi, layer, prev, len, pre);
            let last = l + 1 == layers.len();
            let act = &mut buf.act[l];
            act.clear();
            if last {
                act.extend_from_slice(pre);
            } else {
                act.extend(pre.iter().map(|&u| activate(activation, u)));
            }
        }
        &buf.act[layers.len() - 1]
    }

    /// One network's backward pass over a block, from `d_out`
    /// (`[fan_out, len]`): recomputes the block's activations, then adds
    /// every weight's and bias's gradient to `grad`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn net_backward(
        &self,
        phi: &[f64],
        layers: &[Layer],
        activation: Activation,
        rows: Range<usize>,
        d_out: &[f64],
        buf: &mut Buffers,
        grad: &mut [f64],
    ) {
        let len = rows.len();
        self.net_forward(phi, layers, activation, rows, buf);
        let mut delta = d_out.to_vec();
        for l in (0..layers.len()).rev() {
            let layer = layers[l];
            if l + 1 < layers.len() {
                // Through the activation: δ ← δ ⊙ act'(pre).
                for (d, &u) in delta.iter_mut().zip(&buf.pre[l]) {
                    *d *= slope(activation, u);
                }
            }
            let prev: &[f64] = if l == 0 { &buf.input } else { &buf.act[l - 1] };
            for j in 0..layer.fan_out {
                let dj = &delta[j * len..(j + 1) * len];
                grad[layer.b + j] += lane_sum(dj);
                for i in 0..layer.fan_in {
                    grad[layer.w + j * layer.fan_in + i] +=
                        lane_dot(dj, &prev[i * len..(i + 1) * len]);
                }
            }
            if l > 0 {
                let mut below = vec![0.0; layer.fan_in * len];
                let mut column = vec![0.0; layer.fan_out];
                for (i, row) in below.chunks_mut(len).enumerate() {
                    for (j, c) in column.iter_mut().enumerate() {
                        *c = phi[layer.w + j * layer.fan_in + i];
                    }
                    mix(row, 0.0, &column, &delta);
                }
                delta = below;
            }
        }
    }
}

/// Block-local activations, reused across blocks.
#[derive(Default)]
struct Buffers {
    input: Vec<f64>,
    pre: Vec<Vec<f64>>,
    act: Vec<Vec<f64>>,
}

/// `out[j, t] = b_j + Σ_i W_ji prev[i, t]` over a block of `len` rows,
/// feature-major.
#[inline(always)]
fn affine(phi: &[f64], layer: &Layer, prev: &[f64], len: usize, out: &mut Vec<f64>) {
    out.clear();
    out.resize(layer.fan_out * len, 0.0);
    for (j, row) in out.chunks_mut(len).enumerate() {
        let w = &phi[layer.w + j * layer.fan_in..layer.w + (j + 1) * layer.fan_in];
        mix(row, phi[layer.b + j], w, prev);
    }
}

/// Rows per register tile of [`mix`].
const TILE: usize = 32;

/// `out[t] = start + Σ_i weights[i] · inputs[i, t]` (`inputs` is
/// `[weights.len(), out.len()]`), summed in the order of i. A tile of
/// [`TILE`] rows accumulates in registers over every i, so each product
/// costs one load instead of a load, a load and a store.
#[inline(always)]
fn mix(out: &mut [f64], start: f64, weights: &[f64], inputs: &[f64]) {
    let len = out.len();
    let whole = len - len % TILE;
    for t0 in (0..whole).step_by(TILE) {
        let mut acc = [start; TILE];
        for (i, &w) in weights.iter().enumerate() {
            let p = &inputs[i * len + t0..i * len + t0 + TILE];
            for (a, v) in acc.iter_mut().zip(p) {
                *a += w * v;
            }
        }
        out[t0..t0 + TILE].copy_from_slice(&acc);
    }
    for (t, o) in out.iter_mut().enumerate().skip(whole) {
        let mut acc = start;
        for (i, &w) in weights.iter().enumerate() {
            acc += w * inputs[i * len + t];
        }
        *o = acc;
    }
}

/// The hidden activation (as [`crate::function`]: `relu`, and
/// `max(0.2 u, u)`).
#[inline(always)]
fn activate(activation: Activation, u: f64) -> f64 {
    match activation {
        Activation::Relu => {
            if u > 0.0 {
                u
            } else {
                0.0
            }
        }
        Activation::LeakyRelu => {
            if u > 0.0 {
                u
            } else {
                0.2 * u
            }
        }
    }
}

/// Its derivative (at 0: the left one, as libtorch's relu).
#[inline(always)]
fn slope(activation: Activation, u: f64) -> f64 {
    match activation {
        Activation::Relu => f64::from(u8::from(u > 0.0)),
        Activation::LeakyRelu => {
            if u > 0.0 {
                1.0
            } else {
                0.2
            }
        }
    }
}

/// [`HostNet::forward`], compiled for AVX2 where the CPU has it (as
/// `super::work`).
#[allow(unsafe_code)]
pub(crate) fn forward(
    net: &HostNet,
    phi: &[f64],
    rows: Range<usize>,
    mean: &mut [f64],
    log_sd: &mut [f64],
) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: `forward_avx2` requires AVX2 and nothing else, and the
        // CPU has it (checked at run time just above).
        return unsafe { forward_avx2(net, phi, rows, mean, log_sd) };
    }
    net.forward(phi, rows, mean, log_sd);
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(unsafe_code)]
unsafe fn forward_avx2(
    net: &HostNet,
    phi: &[f64],
    rows: Range<usize>,
    mean: &mut [f64],
    log_sd: &mut [f64],
) {
    net.forward(phi, rows, mean, log_sd);
}

/// [`HostNet::backward`], compiled for AVX2 where the CPU has it.
#[allow(unsafe_code)]
pub(crate) fn backward(
    net: &HostNet,
    phi: &[f64],
    rows: Range<usize>,
    d_mean: &[f64],
    d_log_sd: &[f64],
    grad: &mut [f64],
) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: as in `forward`.
        return unsafe { backward_avx2(net, phi, rows, d_mean, d_log_sd, grad) };
    }
    net.backward(phi, rows, d_mean, d_log_sd, grad);
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(unsafe_code)]
unsafe fn backward_avx2(
    net: &HostNet,
    phi: &[f64],
    rows: Range<usize>,
    d_mean: &[f64],
    d_log_sd: &[f64],
    grad: &mut [f64],
) {
    net.backward(phi, rows, d_mean, d_log_sd, grad);
}

/// Writes the values of `params` into the tensors of `slots` (each in its
/// own kind; no gradient is recorded).
pub(crate) fn write_back(slots: &[Slot], params: &[f64]) {
    tch::no_grad(|| {
        for slot in slots {
            let n = slot.tensor.numel();
            let src = Tensor::from_slice(&params[slot.start..slot.start + n])
                .to_kind(slot.tensor.kind())
                .view(slot.tensor.size().as_slice());
            let mut dst = slot.tensor.shallow_clone();
            dst.copy_(&src);
        }
    });
}
