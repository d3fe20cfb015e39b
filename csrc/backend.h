// backend: the device that holds a tensor, and one ggml backend per device, started on first use and kept for
// the engine's life. The mover and the scorer share it (a second backend per device would hold a second CUDA
// stream and its buffers).
#pragma once

#include <string>
#include <utility>
#include <vector>

struct ggml_tensor;
struct ggml_backend;
struct ggml_backend_device;

namespace tova {

// The device whose backend computes on t's buffer; plain host buffers name no device: the CPU's. NULL if none.
ggml_backend_device * device_of(const ggml_tensor * t);

class backends {
public:
    ~backends();
    backends() = default;
    backends(const backends &) = delete;
    backends & operator=(const backends &) = delete;
    // CPU threads of the CPU backend (the flash-attention scores on a host cache), started or not: the session
    // may change it between decodes (tova_cpp/threads.py follows the cores other processes leave free).
    void set_threads(int n);
    // The backend for t's device; NULL and err filled when there is none.
    ggml_backend * for_tensor(const ggml_tensor * t, std::string & err);

private:
    std::vector<std::pair<ggml_backend_device *, ggml_backend *>> started_;
    int n_threads_ = 1;
};

}  // namespace tova
