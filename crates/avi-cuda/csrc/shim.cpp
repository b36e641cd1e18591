// avi-cuda: the few libtorch C++ entry points that tch 0.24 does not bind.
//
// * CUDA graph capture and replay (at::cuda::CUDAGraph on a pool stream);
// * libtorch's fused Adam kernel (at::_fused_adam_) with tensor step counts,
//   so that an optimiser step reads nothing from the host and can be
//   captured;
// * libtorch's own torch::optim::Adam, built as tch builds it, with its
//   per-parameter state readable and writable (checkpoints);
// * the state of a generator (get_state / set_state).
//
// Tensors cross the boundary as tch's handles (`torch::Tensor *`). Every
// function catches C++ exceptions and reports them through avi_cuda_error().
// Built with AVI_CUDA_GRAPHS when libtorch has CUDA and the CUDA headers are
// found; otherwise the graph functions report that they are unavailable.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_fused_adam.h>
#include <torch/optim/adam.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <optional>
#include <string>
#include <vector>

#ifdef AVI_CUDA_GRAPHS
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dirent.h>
#include <dlfcn.h>
#include <nvrtc.h>
#endif

namespace {

thread_local std::string last_error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return 1;
}

std::vector<at::Tensor> gather(at::Tensor** ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

#ifdef AVI_CUDA_GRAPHS
struct Graph {
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream stream;
  std::optional<c10::cuda::CUDAStream> previous;
  explicit Graph(c10::DeviceIndex device)
      : graph(), stream(c10::cuda::getStreamFromPool(false, device)) {}
};
#endif

}  // namespace

extern "C" {

// The message of the last failed call on this thread.
const char* avi_cuda_error() { return last_error.c_str(); }

// 1 when the graph functions are compiled in.
int avi_cuda_graphs_compiled() {
#ifdef AVI_CUDA_GRAPHS
  return 1;
#else
  return 0;
#endif
}

// One Adam step (β1, β2, ε, no weight decay, no AMSGrad) over n parameters:
// increments every step count (float tensors of the parameters' device), then
// runs libtorch's fused Adam kernel. Reads nothing back to the host.
int avi_fused_adam(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs,
                   at::Tensor** exp_avg_sqs, at::Tensor** steps, size_t n, double lr,
                   double beta1, double beta2, double eps) {
  return guarded([&] {
    auto p = gather(params, n);
    auto g = gather(grads, n);
    auto m = gather(exp_avgs, n);
    auto v = gather(exp_avg_sqs, n);
    auto s = gather(steps, n);
    at::_foreach_add_(s, 1.0);
    at::_fused_adam_(p, g, m, v, {}, s, lr, beta1, beta2, /*weight_decay=*/0.0, eps,
                     /*amsgrad=*/false, /*maximize=*/false);
  });
}

// A new graph for CUDA device `device`, with its own capture stream.
int avi_graph_new(int device, void** out) {
#ifdef AVI_CUDA_GRAPHS
  return guarded([&] { *out = new Graph(static_cast<c10::DeviceIndex>(device)); });
#else
  (void)device;
  (void)out;
  last_error = "avi-cuda was built without CUDA graphs (no CUDA libtorch or CUDA headers)";
  return 1;
#endif
}

void avi_graph_free(void* g) {
#ifdef AVI_CUDA_GRAPHS
  try {
    delete static_cast<Graph*>(g);
  } catch (...) {
  }
#else
  (void)g;
#endif
}

// Make the graph's stream the current stream of this thread (warm-up and
// capture run there); avi_graph_leave_stream restores the previous one.
int avi_graph_enter_stream(void* g) {
#ifdef AVI_CUDA_GRAPHS
  return guarded([&] {
    auto* gr = static_cast<Graph*>(g);
    gr->previous = c10::cuda::getCurrentCUDAStream(gr->stream.device_index());
    c10::cuda::setCurrentCUDAStream(gr->stream);
  });
#else
  (void)g;
  last_error = "CUDA graphs not compiled in";
  return 1;
#endif
}

int avi_graph_leave_stream(void* g) {
#ifdef AVI_CUDA_GRAPHS
  return guarded([&] {
    auto* gr = static_cast<Graph*>(g);
    if (gr->previous) {
      c10::cuda::setCurrentCUDAStream(*gr->previous);
      gr->previous.reset();
    }
  });
#else
  (void)g;
  last_error = "CUDA graphs not compiled in";
  return 1;
#endif
}

// Block until the graph's stream has finished its work.
int avi_graph_sync_stream(void* g) {
#ifdef AVI_CUDA_GRAPHS
  return guarded([&] { static_cast<Graph*>(g)->stream.synchronize(); });
#else
  (void)g;
  last_error = "CUDA graphs not compiled in";
  return 1;
#endif
}

int avi_graph_capture_begin(void* g) {
#ifdef AVI_CUDA_GRAPHS
  return guarded([&] { static_cast<Graph*>(g)->graph.capture_begin(); });
#else
  (void)g;
  last_error = "CUDA graphs not compiled in";
  return 1;
#endif
}

int avi_graph_capture_end(void* g) {
#ifdef AVI_CUDA_GRAPHS
  return guarded([&] { static_cast<Graph*>(g)->graph.capture_end(); });
#else
  (void)g;
  last_error = "CUDA graphs not compiled in";
  return 1;
#endif
}

// Launch the captured work on the current stream.
int avi_graph_replay(void* g) {
#ifdef AVI_CUDA_GRAPHS
  return guarded([&] { static_cast<Graph*>(g)->graph.replay(); });
#else
  (void)g;
  last_error = "CUDA graphs not compiled in";
  return 1;
#endif
}

// Peak bytes allocated by libtorch's CUDA caching allocator on `device`
// since the process started (the allocator's own statistic).
int avi_cuda_peak_allocated(int device, long long* out) {
#ifdef AVI_CUDA_GRAPHS
  return guarded([&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    *out = static_cast<long long>(
        stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
            .peak);
  });
#else
  (void)device;
  (void)out;
  last_error = "CUDA support not compiled in";
  return 1;
#endif
}

}  // extern "C"

#ifdef AVI_CUDA_GRAPHS
namespace {

// The CUDA driver and NVRTC, opened at run time: libtorch links neither
// directly, and a build machine without a GPU has no libcuda to link.
struct Driver {
  CUresult (*cuInit)(unsigned int);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDeviceGetAttribute)(int*, CUdevice_attribute, CUdevice);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuModuleUnload)(CUmodule);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void**, void**);
  CUresult (*cuGetErrorString)(CUresult, const char**);
};

struct Nvrtc {
  nvrtcResult (*nvrtcCreateProgram)(nvrtcProgram*, const char*, const char*, int,
                                    const char* const*, const char* const*);
  nvrtcResult (*nvrtcCompileProgram)(nvrtcProgram, int, const char* const*);
  nvrtcResult (*nvrtcGetProgramLogSize)(nvrtcProgram, size_t*);
  nvrtcResult (*nvrtcGetProgramLog)(nvrtcProgram, char*);
  nvrtcResult (*nvrtcGetPTXSize)(nvrtcProgram, size_t*);
  nvrtcResult (*nvrtcGetPTX)(nvrtcProgram, char*);
  nvrtcResult (*nvrtcDestroyProgram)(nvrtcProgram*);
  const char* (*nvrtcGetErrorString)(nvrtcResult);
};

template <typename T>
void sym(void* lib, const char* name, T& out) {
  void* p = dlsym(lib, name);
  if (!p) throw std::runtime_error(std::string("symbol not found: ") + name);
  out = reinterpret_cast<T>(p);
}

void* open_nvrtc() {
  const char* names[] = {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"};
  for (const char* n : names) {
    if (void* h = dlopen(n, RTLD_NOW | RTLD_GLOBAL)) return h;
  }
  // beside libtorch's CUDA libraries: a PyPI torch keeps NVRTC in
  // site-packages/nvidia/cu*/lib, two folders up from torch/lib
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&c10::cuda::device_count), &info) && info.dli_fname) {
    std::string lib(info.dli_fname);
    std::string dir = lib.substr(0, lib.find_last_of('/'));
    const char* rel[] = {"/../../nvidia/cu13/lib/libnvrtc.so.13",
                         "/../../nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
                         "/../../nvidia/cu12/lib/libnvrtc.so.12"};
    for (const char* r : rel) {
      std::string path = dir + r;
      std::string libdir = path.substr(0, path.find_last_of('/'));
      // NVRTC opens its builtins library by name; load it from the same
      // folder first so that name is already resolved.
      if (DIR* d = opendir(libdir.c_str())) {
        while (dirent* e = readdir(d)) {
          std::string f = e->d_name;
          if (f.rfind("libnvrtc-builtins.so", 0) == 0 && f.find(".alt") == std::string::npos) {
            dlopen((libdir + "/" + f).c_str(), RTLD_NOW | RTLD_GLOBAL);
          }
        }
        closedir(d);
      }
      if (void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) return h;
    }
  }
  throw std::runtime_error("NVRTC (libnvrtc.so) not found");
}

const Driver& driver() {
  static Driver d = [] {
    Driver d{};
    void* cu = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!cu) throw std::runtime_error("the CUDA driver (libcuda.so.1) not found");
    sym(cu, "cuInit", d.cuInit);
    sym(cu, "cuDeviceGet", d.cuDeviceGet);
    sym(cu, "cuDeviceGetAttribute", d.cuDeviceGetAttribute);
    sym(cu, "cuModuleLoadData", d.cuModuleLoadData);
    sym(cu, "cuModuleGetFunction", d.cuModuleGetFunction);
    sym(cu, "cuModuleUnload", d.cuModuleUnload);
    sym(cu, "cuLaunchKernel", d.cuLaunchKernel);
    sym(cu, "cuGetErrorString", d.cuGetErrorString);
    return d;
  }();
  return d;
}

const Nvrtc& nvrtc() {
  static Nvrtc d = [] {
    Nvrtc d{};
    void* rt = open_nvrtc();
    sym(rt, "nvrtcCreateProgram", d.nvrtcCreateProgram);
    sym(rt, "nvrtcCompileProgram", d.nvrtcCompileProgram);
    sym(rt, "nvrtcGetProgramLogSize", d.nvrtcGetProgramLogSize);
    sym(rt, "nvrtcGetProgramLog", d.nvrtcGetProgramLog);
    sym(rt, "nvrtcGetPTXSize", d.nvrtcGetPTXSize);
    sym(rt, "nvrtcGetPTX", d.nvrtcGetPTX);
    sym(rt, "nvrtcDestroyProgram", d.nvrtcDestroyProgram);
    sym(rt, "nvrtcGetErrorString", d.nvrtcGetErrorString);
    return d;
  }();
  return d;
}

void cu_check(CUresult r, const char* what) {
  if (r == CUDA_SUCCESS) return;
  const char* s = nullptr;
  driver().cuGetErrorString(r, &s);
  throw std::runtime_error(std::string(what) + ": " + (s ? s : "unknown CUDA error"));
}

void rtc_check(nvrtcResult r, const char* what) {
  if (r == NVRTC_SUCCESS) return;
  throw std::runtime_error(std::string(what) + ": " + nvrtc().nvrtcGetErrorString(r));
}

// PTX of `src` for compute capability major.minor (NVRTC).
std::string compile_ptx(const char* src, int major, int minor) {
  const Nvrtc& d = nvrtc();
  nvrtcProgram prog;
  rtc_check(d.nvrtcCreateProgram(&prog, src, "avi_fvi.cu", 0, nullptr, nullptr),
            "nvrtcCreateProgram");
  std::string arch = "--gpu-architecture=compute_" + std::to_string(major * 10 + minor);
  const char* opts[] = {arch.c_str(), "--std=c++17", "-default-device"};
  nvrtcResult r = d.nvrtcCompileProgram(prog, 3, opts);
  if (r != NVRTC_SUCCESS) {
    size_t n = 0;
    d.nvrtcGetProgramLogSize(prog, &n);
    std::string log(n, '\0');
    d.nvrtcGetProgramLog(prog, &log[0]);
    d.nvrtcDestroyProgram(&prog);
    throw std::runtime_error("NVRTC compile failed: " + log);
  }
  size_t n = 0;
  rtc_check(d.nvrtcGetPTXSize(prog, &n), "nvrtcGetPTXSize");
  std::string ptx(n, '\0');
  rtc_check(d.nvrtcGetPTX(prog, &ptx[0]), "nvrtcGetPTX");
  d.nvrtcDestroyProgram(&prog);
  return ptx;
}

struct Fvi {
  int device;
  CUmodule module;
  CUfunction local, global, draw;
};

float* fptr(at::Tensor* t) { return t ? t->data_ptr<float>() : nullptr; }

void launch(const Fvi& f, CUfunction fn, unsigned grid, unsigned block, unsigned shmem,
            void** args) {
  const auto dev = static_cast<c10::DeviceIndex>(f.device);
  if (c10::cuda::current_device() != dev) c10::cuda::set_device(dev);
  CUstream stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(f.device)).stream();
  cu_check(driver().cuLaunchKernel(fn, grid, 1, 1, block, 1, 1, shmem, stream, args, nullptr),
           "cuLaunchKernel");
}

}  // namespace
#endif

extern "C" {

// Compile (NVRTC) and load the F-VI kernels `src` for CUDA device `device`.
int avi_fvi_load(int device, const char* src, void** out) {
#ifdef AVI_CUDA_GRAPHS
  return guarded([&] {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    const Driver& d = driver();
    cu_check(d.cuInit(0), "cuInit");
    CUdevice dev;
    cu_check(d.cuDeviceGet(&dev, device), "cuDeviceGet");
    int major = 0, minor = 0;
    cu_check(d.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
             "cuDeviceGetAttribute");
    cu_check(d.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
             "cuDeviceGetAttribute");
    std::string ptx = compile_ptx(src, major, minor);
    auto* f = new Fvi{device, nullptr, nullptr, nullptr, nullptr};
    try {
      cu_check(d.cuModuleLoadData(&f->module, ptx.c_str()), "cuModuleLoadData");
      cu_check(d.cuModuleGetFunction(&f->local, f->module, "fvi_local"), "fvi_local");
      cu_check(d.cuModuleGetFunction(&f->global, f->module, "fvi_global"), "fvi_global");
      cu_check(d.cuModuleGetFunction(&f->draw, f->module, "fvi_draw_theta"), "fvi_draw_theta");
    } catch (...) {
      delete f;
      throw;
    }
    *out = f;
  });
#else
  (void)device;
  (void)src;
  (void)out;
  last_error = "avi-cuda was built without CUDA support";
  return 1;
#endif
}

// PTX of `src` for compute capability major.minor, without a GPU (a check
// that the kernel source compiles). Writes at most `cap` bytes (NUL
// included) to `out`; *len receives the PTX length.
int avi_fvi_compile_only(const char* src, int major, int minor, char* out, size_t cap,
                         size_t* len) {
#ifdef AVI_CUDA_GRAPHS
  return guarded([&] {
    std::string ptx = compile_ptx(src, major, minor);
    *len = ptx.size();
    if (cap > 0) {
      size_t n = std::min(cap - 1, ptx.size());
      std::memcpy(out, ptx.data(), n);
      out[n] = '\0';
    }
  });
#else
  (void)src; (void)major; (void)minor; (void)out; (void)cap; (void)len;
  last_error = "avi-cuda was built without CUDA support";
  return 1;
#endif
}

void avi_fvi_free(void* f) {
#ifdef AVI_CUDA_GRAPHS
  if (!f) return;
  auto* fv = static_cast<Fvi*>(f);
  try {
    driver().cuModuleUnload(fv->module);
  } catch (...) {
  }
  delete fv;
#else
  (void)f;
#endif
}

// The buffers of one F-VI problem (float32 unless noted, on the kernels'
// device): x, prev [N]; mean, log_sd [N]; adam_m, adam_v [2N]; tp [2] (μ_θ,
// log s_θ); theta_adam [4]; theta, eps_theta [M]; dtheta [M] f64; acc [2]
// f64; state [1] int32 (the 1-based step).
struct AviFviBuffers {
  at::Tensor *x, *prev, *mean, *log_sd, *adam_m, *adam_v, *tp, *theta_adam, *theta, *eps_theta,
      *dtheta, *acc, *state;
};

struct AviFviConfig {
  int model;
  float p0, p1;
  int n, draws, mc;
  unsigned long long seed;
  double constant;
  float lr, beta1, beta2, eps;
};

// The first step's θ draws.
int avi_fvi_draw_theta(void* f, const AviFviBuffers* b, const AviFviConfig* c) {
#ifdef AVI_CUDA_GRAPHS
  return guarded([&] {
    auto* fv = static_cast<Fvi*>(f);
    float* tp = fptr(b->tp);
    float* theta = fptr(b->theta);
    float* eps_theta = fptr(b->eps_theta);
    int draws = c->draws;
    void* state = b->state->data_ptr();
    unsigned long long seed = c->seed;
    void* args[] = {&tp, &theta, &eps_theta, &draws, &state, &seed};
    launch(*fv, fv->draw, 1, 256, 0, args);
  });
#else
  (void)f; (void)b; (void)c;
  last_error = "avi-cuda was built without CUDA support";
  return 1;
#endif
}

// One training iteration: fvi_local over N, then fvi_global. `elbo_out`
// (nullable) is a float32 tensor whose first element receives the ELBO
// estimate; dbg_eps [M, N], dbg_grad [2N] and dbg_theta [3] (nullable)
// receive the draws, the local gradients, and θ's gradient with the ELBO.
int avi_fvi_step(void* f, const AviFviBuffers* b, const AviFviConfig* c, at::Tensor* elbo_out,
                 at::Tensor* dbg_eps, at::Tensor* dbg_grad, at::Tensor* dbg_theta) {
#ifdef AVI_CUDA_GRAPHS
  return guarded([&] {
    auto* fv = static_cast<Fvi*>(f);
    int model = c->model, n = c->n, draws = c->draws, mc = c->mc;
    float p0 = c->p0, p1 = c->p1, lr = c->lr, b1 = c->beta1, b2 = c->beta2, eps = c->eps;
    unsigned long long seed = c->seed;
    double constant = c->constant;
    float *x = fptr(b->x), *prev = fptr(b->prev), *mean = fptr(b->mean),
          *log_sd = fptr(b->log_sd), *am = fptr(b->adam_m), *av = fptr(b->adam_v),
          *theta = fptr(b->theta), *tp = fptr(b->tp), *ta = fptr(b->theta_adam),
          *eps_theta = fptr(b->eps_theta);
    void* dtheta = b->dtheta->data_ptr();
    void* acc = b->acc->data_ptr();
    void* state = b->state->data_ptr();
    float *de = fptr(dbg_eps), *dg = fptr(dbg_grad), *dt = fptr(dbg_theta),
          *eo = fptr(elbo_out);
    const unsigned block = 256;
    const unsigned grid = static_cast<unsigned>((n + block - 1) / block);
    void* largs[] = {&model, &p0,   &p1,  &x,     &prev, &n,    &draws, &mean,
                     &log_sd, &am,  &av,  &theta, &dtheta, &acc, &state, &seed,
                     &mc,    &lr,   &b1,  &b2,    &eps,  &de,   &dg};
    launch(*fv, fv->local, grid, block, static_cast<unsigned>((draws + 2) * sizeof(float)),
           largs);
    void* gargs[] = {&model, &draws, &mc, &tp, &ta, &theta, &eps_theta, &dtheta, &acc, &state,
                     &seed, &constant, &lr, &b1, &b2, &eps, &eo, &dt};
    launch(*fv, fv->global, 1, 256, 0, gargs);
  });
#else
  (void)f; (void)b; (void)c; (void)elbo_out; (void)dbg_eps; (void)dbg_grad; (void)dbg_theta;
  last_error = "avi-cuda was built without CUDA support";
  return 1;
#endif
}

}  // extern "C"

// ---- random generators -------------------------------------------------
// A copy of the default generator of a device (device_type 0: CPU, 1:
// CUDA with index `index`), with its whole state: the draws it gives next
// are the ones the default generator would give next.
namespace {
at::Generator default_generator(int device_type, int index) {
  if (device_type == 0) return at::detail::getDefaultCPUGenerator();
#ifdef AVI_CUDA_GRAPHS
  return at::cuda::detail::getDefaultCUDAGenerator(static_cast<c10::DeviceIndex>(index));
#else
  (void)index;
  throw std::runtime_error("CUDA generators need avi-cuda built with CUDA support");
#endif
}
}  // namespace

extern "C" {

int avi_generator_clone_default(int device_type, int index, void** out) {
  return guarded([&] {
    at::Generator g = default_generator(device_type, index);
    std::lock_guard<std::mutex> lock(g.mutex());
    *out = new at::Generator(g.clone());
  });
}

// Give the default generator of the device the state of `gen`.
int avi_generator_restore_default(void* gen, int device_type, int index) {
  return guarded([&] {
    auto* g = static_cast<at::Generator*>(gen);
    at::Generator d = default_generator(device_type, index);
    at::Tensor state;
    {
      std::lock_guard<std::mutex> lock(g->mutex());
      state = g->get_state();
    }
    std::lock_guard<std::mutex> lock(d.mutex());
    d.set_state(state);
  });
}

void avi_generator_free(void* gen) { delete static_cast<at::Generator*>(gen); }

// Standard normals of shape `sizes` from `gen`, as libtorch's randn draws
// them (kind 6: f32, 7: f64; device_type as above).
int avi_randn(void* gen, const int64_t* sizes, size_t ndim, int kind, int device_type,
              int index, at::Tensor** out) {
  return guarded([&] {
    auto* g = static_cast<at::Generator*>(gen);
    auto opts = at::TensorOptions().dtype(kind == 7 ? at::kDouble : at::kFloat);
    opts = device_type == 0
               ? opts.device(at::kCPU)
               : opts.device(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index)));
    // (at::randn takes the generator's lock itself)
    *out = new at::Tensor(at::randn(at::IntArrayRef(sizes, ndim), *g, opts));
  });
}

}  // extern "C"

// ---- generator state ----------------------------------------------------
extern "C" {

// The whole state of `gen` (a uint8 tensor; on the CPU the Mersenne Twister
// state and the cached normals).
int avi_generator_get_state(void* gen, at::Tensor** out) {
  return guarded([&] {
    auto* g = static_cast<at::Generator*>(gen);
    std::lock_guard<std::mutex> lock(g->mutex());
    *out = new at::Tensor(g->get_state());
  });
}

// Give `gen` the state `state` (from avi_generator_get_state of a generator
// of the same device type).
int avi_generator_set_state(void* gen, at::Tensor* state) {
  return guarded([&] {
    auto* g = static_cast<at::Generator*>(gen);
    std::lock_guard<std::mutex> lock(g->mutex());
    g->set_state(*state);
  });
}

}  // extern "C"

// ---- libtorch's Adam -----------------------------------------------------
// torch::optim::Adam built exactly as tch's `nn::Adam::build` builds it
// (torch-sys's ato_adam, then ato_add_parameters per variable with its
// group), so that its steps are the same code on the same state; its
// per-parameter state (step count, first and second moments) can be read
// and written.
namespace {
torch::optim::AdamParamState* adam_state(torch::optim::Adam* opt, at::Tensor* param) {
  auto& state = opt->state();
  auto it = state.find(param->unsafeGetTensorImpl());
  if (it == state.end()) return nullptr;
  auto* s = dynamic_cast<torch::optim::AdamParamState*>(it->second.get());
  if (s == nullptr) throw std::runtime_error("optimizer state is not Adam's");
  return s;
}
}  // namespace

extern "C" {

int avi_adam_new(double lr, double beta1, double beta2, double weight_decay, double eps,
                 at::Tensor** params, const size_t* groups, size_t n, void** out) {
  return guarded([&] {
    auto options = torch::optim::AdamOptions(lr)
                       .betas(std::tuple<double, double>(beta1, beta2))
                       .weight_decay(weight_decay)
                       .eps(eps)
                       .amsgrad(false);
    auto* opt = new torch::optim::Adam(std::vector<torch::Tensor>(), options);
    try {
      auto& param_groups = opt->param_groups();
      for (size_t i = 0; i < n; ++i) {
        while (param_groups.size() <= groups[i]) {
          param_groups.push_back(
              torch::optim::OptimizerParamGroup({}, opt->defaults().clone()));
        }
        param_groups[groups[i]].params().push_back(*params[i]);
      }
    } catch (...) {
      delete opt;
      throw;
    }
    *out = opt;
  });
}

void avi_adam_free(void* opt) { delete static_cast<torch::optim::Adam*>(opt); }

int avi_adam_zero_grad(void* opt) {
  return guarded([&] { static_cast<torch::optim::Adam*>(opt)->zero_grad(); });
}

int avi_adam_step(void* opt) {
  return guarded([&] { static_cast<torch::optim::Adam*>(opt)->step(); });
}

// The learning rate of the defaults and of every group (as tch's
// ato_set_learning_rate; every options object of this optimizer is an
// AdamOptions, so nothing here throws).
void avi_adam_set_lr(void* opt, double lr) {
  auto* o = static_cast<torch::optim::Adam*>(opt);
  static_cast<torch::optim::AdamOptions&>(o->defaults()).lr(lr);
  for (auto& g : o->param_groups()) {
    static_cast<torch::optim::AdamOptions&>(g.options()).lr(lr);
  }
}

// The state of parameter `param`: *present = 0 before its first step;
// otherwise its step count and copies of its moments.
int avi_adam_get_state(void* opt, at::Tensor* param, int* present, int64_t* step,
                       at::Tensor** exp_avg, at::Tensor** exp_avg_sq) {
  return guarded([&] {
    auto* s = adam_state(static_cast<torch::optim::Adam*>(opt), param);
    *present = s != nullptr;
    if (s == nullptr) return;
    *step = s->step();
    *exp_avg = new at::Tensor(s->exp_avg().detach().clone());
    *exp_avg_sq = new at::Tensor(s->exp_avg_sq().detach().clone());
  });
}

// Set the state of parameter `param` as Adam's first step creates it
// (moments `zeros_like(param)` in the parameter's memory format, here
// holding copies of the given values).
int avi_adam_set_state(void* opt, at::Tensor* param, int64_t step, at::Tensor* exp_avg,
                       at::Tensor* exp_avg_sq) {
  return guarded([&] {
    auto* o = static_cast<torch::optim::Adam*>(opt);
    at::NoGradGuard no_grad;
    const at::Tensor& p = *param;
    if (!exp_avg->sizes().equals(p.sizes()) || !exp_avg_sq->sizes().equals(p.sizes())) {
      throw std::runtime_error("Adam moments of another shape than their parameter");
    }
    auto state = std::make_unique<torch::optim::AdamParamState>();
    state->step(step);
    auto m = at::zeros_like(p, at::MemoryFormat::Preserve);
    m.copy_(*exp_avg);
    auto v = at::zeros_like(p, at::MemoryFormat::Preserve);
    v.copy_(*exp_avg_sq);
    state->exp_avg(m);
    state->exp_avg_sq(v);
    o->state()[p.unsafeGetTensorImpl()] = std::move(state);
  });
}

}  // extern "C"
