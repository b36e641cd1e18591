// avi-cuda: the few libtorch C++ entry points that tch 0.24 does not bind.
//
// * CUDA graph capture and replay (at::cuda::CUDAGraph on a pool stream);
// * libtorch's fused Adam kernel (at::_fused_adam_) with tensor step counts,
//   so that an optimiser step reads nothing from the host and can be
//   captured.
//
// Tensors cross the boundary as tch's handles (`torch::Tensor *`). Every
// function catches C++ exceptions and reports them through avi_cuda_error().
// Built with AVI_CUDA_GRAPHS when libtorch has CUDA and the CUDA headers are
// found; otherwise the graph functions report that they are unavailable.

#include <ATen/ATen.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_fused_adam.h>

#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#ifdef AVI_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
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
