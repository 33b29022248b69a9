// Named weights of one model, resident on one backend.
//
// Each entry keeps the backend view (`Weight`, what kernels read; on CUDA a
// device copy) and the host view (the memory-mapped GGUF bytes, for scalars
// such as gates that the model reads on the host). Shapes are in numpy/HF
// order (outermost first), i.e. GGUF's ne[] reversed.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"

namespace mq {

struct NamedTensor {
    Weight w;                    // backend view: rows = prod(shape[:-1]), cols = shape[-1]
    const void* host = nullptr;  // host bytes (mapped file)
    std::vector<int64_t> shape;  // numpy order
};

class TensorMap {
public:
    void add(const std::string& name, NamedTensor t) { map_[name] = std::move(t); }
    bool has(const std::string& name) const { return map_.count(name) != 0; }
    size_t size() const { return map_.size(); }

    const NamedTensor& at(const std::string& name) const {
        auto it = map_.find(name);
        if (it == map_.end()) throw std::runtime_error("model file is missing tensor '" + name + "'");
        return it->second;
    }
    const Weight& get(const std::string& name) const { return at(name).w; }

    // Like get(), but also checks the shape (-1 matches any extent) and throws
    // a message naming the tensor, the expected and the actual shape.
    const Weight& get(const std::string& name, std::initializer_list<int64_t> shape) const {
        const NamedTensor& t = at(name);
        bool ok = t.shape.size() == shape.size();
        size_t i = 0;
        for (int64_t s : shape) {
            if (!ok) break;
            ok = (s < 0 || t.shape[i] == s);
            i++;
        }
        if (!ok)
            throw std::runtime_error("tensor '" + name + "' has shape " + fmt(t.shape) + ", expected " +
                                     fmt(std::vector<int64_t>(shape)));
        return t.w;
    }

    // A float32 tensor's host data (gates, small constants), with a type check.
    const float* host_f32(const std::string& name) const {
        const NamedTensor& t = at(name);
        if (t.w.type != DType::F32) throw std::runtime_error("tensor '" + name + "' must be f32");
        return static_cast<const float*>(t.host);
    }

    static std::string fmt(const std::vector<int64_t>& s) {
        std::string r = "[";
        for (size_t i = 0; i < s.size(); i++) r += (i ? ", " : "") + std::to_string(s[i]);
        return r + "]";
    }

private:
    std::unordered_map<std::string, NamedTensor> map_;
};

}  // namespace mq
