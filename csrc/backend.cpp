#include "backend.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace tova {

ggml_backend_device * device_of(const ggml_tensor * t) {
    if (!t || !t->buffer) return nullptr;
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(t->buffer));
    if (!dev && ggml_backend_buffer_is_host(t->buffer)) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    return dev;
}

// CPU backends take their thread count from ggml_backend_set_n_threads, found through the registry.
static void apply_threads(ggml_backend_device * dev, ggml_backend * b, int n_threads) {
    if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) return;
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto set_threads =
        (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
    if (set_threads) set_threads(b, n_threads);
}

void backends::set_threads(int n) {
    n_threads_ = n > 0 ? n : 1;
    for (auto & s : started_) apply_threads(s.first, s.second, n_threads_);
}

backends::~backends() {
    for (auto & s : started_) ggml_backend_free(s.second);
}

ggml_backend * backends::for_tensor(const ggml_tensor * t, std::string & err) {
    ggml_backend_dev_t dev = device_of(t);
    if (!dev) {
        err = "cache buffer has no device";
        return nullptr;
    }
    for (auto & s : started_)
        if (s.first == dev) return s.second;
    ggml_backend_t b = ggml_backend_dev_init(dev, nullptr);
    if (!b) {
        err = std::string("cannot start a backend for device ") + ggml_backend_dev_name(dev);
        return nullptr;
    }
    apply_threads(dev, b, n_threads_);
    started_.emplace_back(dev, b);
    return b;
}

ggml_context * graph_context(size_t n_tensors) {
    ggml_init_params ip = {ggml_tensor_overhead() * n_tensors + ggml_graph_overhead_custom(n_tensors, false), nullptr,
                           true};
    return ggml_init(ip);
}

graph_allocator::~graph_allocator() {
    if (galloc_) ggml_gallocr_free(galloc_);
}

bool graph_allocator::alloc(ggml_backend * b, ggml_cgraph * gf) {
    if (galloc_ && b != backend_) {
        ggml_gallocr_free(galloc_);
        galloc_ = nullptr;
    }
    backend_ = b;
    if (!galloc_) galloc_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(b));
    return galloc_ && ggml_gallocr_alloc_graph(galloc_, gf);
}

}  // namespace tova
