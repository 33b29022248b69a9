// The inputs of one decoder step as ONE backend buffer.
//
// A step's per-token and per-sequence inputs (token ids, positions, KV-cache
// rows, the attention segment tables with their cache lengths, the rows whose
// logits are wanted, the sampling parameters) are laid out in one host mirror
// and sent with ONE host->backend copy per step; every op of the step reads
// device pointers into that copy. On CUDA nothing else crosses to the device
// during a step and the block's device address is stable, which is what a
// captured graph replayed with fresh block contents needs.
//
// Usage: plan() the arrays (sizes), begin(), fill host<T>(slot), upload(),
// then pass dev<T>(slot) to the ops.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "backend/backend.h"
#include "model/text.h"

namespace mq {

class StepBlock {
public:
    explicit StepBlock(Backend& be) : dev_(&be) {}

    // Starts a new layout.
    void clear() {
        off_.clear();
        size_ = 0;
    }
    // Reserves an array of n elements of T (64-byte aligned); returns its slot id.
    template <class T>
    int plan(size_t n) {
        size_ = (size_ + 63) / 64 * 64;
        off_.push_back(size_);
        size_ += n * sizeof(T);
        return int(off_.size()) - 1;
    }
    // Allocates the host mirror for the planned layout (contents zeroed).
    void begin() { host_.assign(size_ + 64, 0); }
    template <class T>
    T* host(int slot) {
        return reinterpret_cast<T*>(host_.data() + off_[size_t(slot)]);
    }
    // One copy of the whole block to the backend (the device buffer grows as needed).
    void upload() {
        dev_.reserve(size_ + 64);
        dev_.backend()->to_device(dev_.data(), host_.data(), size_);
    }
    template <class T>
    const T* dev(int slot) const {
        return reinterpret_cast<const T*>(static_cast<const uint8_t*>(dev_.data()) + off_[size_t(slot)]);
    }
    size_t bytes() const { return size_; }

private:
    std::vector<size_t> off_;
    size_t size_ = 0;
    std::vector<uint8_t> host_;
    BackendBuffer dev_;
};

}  // namespace mq
