// The F-VI training iteration of the scalar models (linear, nonlinear,
// saw) as two CUDA kernels, compiled at run time with NVRTC (avi-cuda's
// FviKernels). The objective and its gradient are those of avi's fused CPU
// engine (crates/avi-inference/src/fused.rs): for draws m = 1..M,
// θ_m = μ_θ + s_θ ε_θm and z_mn = μ_n + s_n ε_mn,
//
//   ELBO ≈ (1/M) Σ_m [log p(θ_m) + Σ_n ℓ(θ_m, z_mn, x_n, x_{n−1})
//                     + mc·(½ ε_θm² + ½ Σ_n ε_mn²)]
//          + log s_θ + Σ_n log s_n + C
//
//   ∂/∂μ_n = (1/M) Σ_m ∂ℓ/∂z_mn,   ∂/∂log s_n = (1/M) Σ_m ∂ℓ/∂z_mn ε_mn s_n + 1,
//   ∂/∂μ_θ = (1/M) Σ_m h_m,        ∂/∂log s_θ = (1/M) Σ_m h_m ε_θm s_θ + 1,
//   h_m = ∂ log p(θ_m)/∂θ + Σ_n ∂ℓ/∂θ_m.
//
// fvi_local: one thread per observation n. It draws its M normals
// (Philox4x32-10 keyed on the seed, counter (n, m/4, step, 0); Box–Muller,
// four normals per call), accumulates the value and its two gradients over
// the draws in registers, adds Σ_n ∂ℓ/∂θ_m per draw into dtheta[m] (warp
// shuffles, then shared memory, then one double atomic per block and draw),
// and takes the Adam step of μ_n and log s_n at once: the draws never touch
// memory. fvi_global: one block. It finishes the θ gradient and the ELBO,
// takes θ's Adam step, writes the ELBO estimate, advances the step count,
// zeroes the accumulators and draws the next step's θ values (counter
// (m/4, 0, step, 1)). fvi_draw_theta makes the first step's θ draws.
//
// Adam is libtorch's: m ← β1 m + (1−β1) g, v ← β2 v + (1−β2) g²,
// p ← p − lr/(1−β1^t) · m / (√v/√(1−β2^t) + ε), on the loss −ELBO.

struct U4 {
  unsigned int x, y, z, w;
};

__device__ __forceinline__ U4 philox(U4 c, unsigned int k0, unsigned int k1) {
  const unsigned int M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  const unsigned int W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    unsigned int hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
    unsigned int hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
    U4 d;
    d.x = hi1 ^ c.y ^ k0;
    d.y = lo1;
    d.z = hi0 ^ c.w ^ k1;
    d.w = lo0;
    c = d;
    k0 += W0;
    k1 += W1;
  }
  return c;
}

// Four standard normals from one Philox output (two Box–Muller pairs; the
// radius uses a uniform in (0, 1], so log never sees 0).
__device__ __forceinline__ void normals4(U4 r, float e[4]) {
  const float inv24 = 1.0f / 16777216.0f;
  float u1 = ((float)(r.x >> 8) + 1.0f) * inv24;
  float u2 = (float)(r.y >> 8) * inv24;
  float u3 = ((float)(r.z >> 8) + 1.0f) * inv24;
  float u4 = (float)(r.w >> 8) * inv24;
  float ra = sqrtf(-2.0f * logf(u1)), rb = sqrtf(-2.0f * logf(u3));
  float sa, ca, sb, cb;
  sincospif(2.0f * u2, &sa, &ca);
  sincospif(2.0f * u4, &sb, &cb);
  e[0] = ra * ca;
  e[1] = ra * sa;
  e[2] = rb * cb;
  e[3] = rb * sb;
}

// ℓ without its constant, ∂ℓ/∂z and ∂ℓ/∂θ (avi_models::fused::*_term).
// model 0 linear (p0 = τ, p1 = 1/σ), 1 nonlinear, 2 saw (p0 = α), 3 nonlinear
// with the authors' objective (no −cos z normaliser, flat θ prior).
__device__ __forceinline__ void term(int model, float p0, float p1, float th, float z,
                                     float x, float prev, float& l, float& dz,
                                     float& dth) {
  if (model == 0) {
    float r = (x - th - p0 * z) * p1;
    dth = r * p1;
    l = -0.5f * (z * z + r * r);
    dz = p0 * dth - z;
  } else if (model == 1 || model == 3) {
    float sn, cs;
    sincosf(z, &sn, &cs);
    float inv_s = expf(-cs);
    float g = z * (1.0f + sn);
    float dg = 1.0f + sn + z * cs;
    float r = (x - th - g) * inv_s;
    float norm = model == 1 ? 1.0f : 0.0f;  // the normaliser −cos z, or none
    l = -0.5f * (z * z + r * r) - norm * cs;
    dth = r * inv_s;
    dz = -z + dth * dg + (norm - r * r) * sn;
  } else {
    float a = z - prev;
    float b = x - p0 * (th + z);
    dth = p0 * b;
    l = -0.5f * (a * a + b * b);
    dz = dth - a;
  }
}

// log p(θ) and its derivative: flat for the linear model and the authors'
// nonlinear objective, N(0, 1) otherwise.
__device__ __forceinline__ void log_prior(int model, double th, double& lp, double& dlp) {
  if (model == 0 || model == 3) {
    lp = 0.0;
    dlp = 0.0;
  } else {
    lp = -0.5 * th * th - 0.91893853320467274178;
    dlp = -th;
  }
}

__device__ __forceinline__ void adam(float& p, float& m, float& v, float g, unsigned int t,
                                     float lr, float b1, float b2, float eps) {
  m = b1 * m + (1.0f - b1) * g;
  v = b2 * v + (1.0f - b2) * g * g;
  float bc1 = 1.0f - powf(b1, (float)t);
  float bc2 = 1.0f - powf(b2, (float)t);
  float denom = sqrtf(v) / sqrtf(bc2) + eps;
  p -= (lr / bc1) * (m / denom);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

extern "C" __global__ void fvi_local(
    int model, float p0, float p1, const float* __restrict__ x,
    const float* __restrict__ prev, int n, int draws, float* __restrict__ mean,
    float* __restrict__ log_sd, float* __restrict__ adam_m, float* __restrict__ adam_v,
    const float* __restrict__ theta, double* __restrict__ dtheta, double* __restrict__ acc,
    const unsigned int* __restrict__ state, unsigned long long seed, int mc, float lr,
    float b1, float b2, float eps, float* __restrict__ dbg_eps,
    float* __restrict__ dbg_grad) {
  extern __shared__ float sh[];  // [draws] Σ ∂ℓ/∂θ_m, then Σ value, Σ log s
  for (int k = threadIdx.x; k < draws + 2; k += blockDim.x) sh[k] = 0.0f;
  __syncthreads();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = i < n;
  const unsigned int t = state[0];
  const unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)(seed >> 32);
  float mu = 0.0f, rho = 0.0f, s = 0.0f, xi = 0.0f, pv = 0.0f;
  if (active) {
    mu = mean[i];
    rho = log_sd[i];
    s = expf(rho);
    xi = x[i];
    pv = prev[i];
  }
  float g_mu = 0.0f, g_rho = 0.0f, val = 0.0f;
  for (int m0 = 0; m0 < draws; m0 += 4) {
    U4 c;
    c.x = (unsigned int)i;
    c.y = (unsigned int)(m0 >> 2);
    c.z = t;
    c.w = 0u;
    float e[4];
    normals4(philox(c, k0, k1), e);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int m = m0 + k;
      if (m >= draws) break;  // the same for every lane
      float dth = 0.0f;
      if (active) {
        const float ep = e[k];
        const float z = mu + s * ep;
        float l, dz;
        term(model, p0, p1, theta[m], z, xi, pv, l, dz, dth);
        g_mu += dz;
        g_rho += dz * ep;
        val += mc ? l + 0.5f * ep * ep : l;
        if (dbg_eps) dbg_eps[(size_t)m * n + i] = ep;
      }
      dth = warp_sum(dth);
      if ((threadIdx.x & 31) == 0) atomicAdd(&sh[m], dth);
    }
  }
  float vs = warp_sum(val), rs = warp_sum(active ? rho : 0.0f);
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(&sh[draws], vs);
    atomicAdd(&sh[draws + 1], rs);
  }
  __syncthreads();
  for (int m = threadIdx.x; m < draws; m += blockDim.x) atomicAdd(&dtheta[m], (double)sh[m]);
  if (threadIdx.x == 0) {
    atomicAdd(&acc[0], (double)sh[draws]);
    atomicAdd(&acc[1], (double)sh[draws + 1]);
  }
  if (active) {
    const float inv_m = 1.0f / (float)draws;
    const float d_mu = g_mu * inv_m;              // ∂ELBO/∂μ_n
    const float d_rho = g_rho * s * inv_m + 1.0f;  // ∂ELBO/∂log s_n
    if (dbg_grad) {
      dbg_grad[i] = d_mu;
      dbg_grad[n + i] = d_rho;
    }
    adam(mu, adam_m[i], adam_v[i], -d_mu, t, lr, b1, b2, eps);
    adam(rho, adam_m[n + i], adam_v[n + i], -d_rho, t, lr, b1, b2, eps);
    mean[i] = mu;
    log_sd[i] = rho;
  }
}

// θ draws of step t: eps_theta[m] and theta[m] = μ_θ + s_θ eps_theta[m].
__device__ void draw_theta(const float* tp, float* theta, float* eps_theta, int draws,
                           unsigned int t, unsigned long long seed) {
  const unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)(seed >> 32);
  const float mu = tp[0], s = expf(tp[1]);
  for (int m0 = 4 * threadIdx.x; m0 < draws; m0 += 4 * blockDim.x) {
    U4 c;
    c.x = (unsigned int)(m0 >> 2);
    c.y = 0u;
    c.z = t;
    c.w = 1u;
    float e[4];
    normals4(philox(c, k0, k1), e);
    for (int k = 0; k < 4 && m0 + k < draws; ++k) {
      eps_theta[m0 + k] = e[k];
      theta[m0 + k] = mu + s * e[k];
    }
  }
}

extern "C" __global__ void fvi_draw_theta(const float* tp, float* theta, float* eps_theta,
                                          int draws, const unsigned int* state,
                                          unsigned long long seed) {
  draw_theta(tp, theta, eps_theta, draws, state[0], seed);
}

// One block (a power of two threads, at most 1024).
extern "C" __global__ void fvi_global(
    int model, int draws, int mc, float* tp, float* theta_adam, float* theta,
    float* eps_theta, double* dtheta, double* acc, unsigned int* state,
    unsigned long long seed, double constant, float lr, float b1, float b2, float eps,
    float* elbo_out, float* dbg_theta_grad) {
  __shared__ double red[3][1024];
  __shared__ float new_tp[2];
  // read before thread 0 advances it (after the barriers below)
  const unsigned int t = state[0];
  double sv = 0.0, sg = 0.0, sr = 0.0;
  for (int m = threadIdx.x; m < draws; m += blockDim.x) {
    double lp, dlp;
    log_prior(model, (double)theta[m], lp, dlp);
    const double e = (double)eps_theta[m];
    const double h = dlp + dtheta[m];
    sv += mc ? lp + 0.5 * e * e : lp;
    sg += h;
    sr += h * e;
  }
  red[0][threadIdx.x] = sv;
  red[1][threadIdx.x] = sg;
  red[2][threadIdx.x] = sr;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      for (int k = 0; k < 3; ++k) red[k][threadIdx.x] += red[k][threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double inv_m = 1.0 / (double)draws;
    const double s_theta = exp((double)tp[1]);
    const double elbo = (acc[0] + red[0][0]) * inv_m + constant + acc[1] + (double)tp[1];
    if (elbo_out) *elbo_out = (float)elbo;
    const double d_mu = red[1][0] * inv_m;
    const double d_rho = red[2][0] * s_theta * inv_m + 1.0;
    if (dbg_theta_grad) {
      dbg_theta_grad[0] = (float)d_mu;
      dbg_theta_grad[1] = (float)d_rho;
      dbg_theta_grad[2] = (float)elbo;
    }
    float mu = tp[0], rho = tp[1];
    adam(mu, theta_adam[0], theta_adam[2], (float)-d_mu, t, lr, b1, b2, eps);
    adam(rho, theta_adam[1], theta_adam[3], (float)-d_rho, t, lr, b1, b2, eps);
    tp[0] = mu;
    tp[1] = rho;
    new_tp[0] = mu;
    new_tp[1] = rho;
    acc[0] = 0.0;
    acc[1] = 0.0;
    state[0] = t + 1;
  }
  __syncthreads();
  for (int m = threadIdx.x; m < draws; m += blockDim.x) dtheta[m] = 0.0;
  draw_theta(new_tp, theta, eps_theta, draws, t + 1, seed);
}
