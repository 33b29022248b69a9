// Build a TensorMap from Python without copying on the host:
//   tensors = {name: (array, ggml_type_id, shape_tuple)}
// `array` is the memory-mapped GGUF data (gguf.GGUFReader's tensor.data, any
// dtype, C-contiguous); shape is numpy order (GGUF ne reversed). The caller
// (mllama_q/model.py) keeps the arrays (and so the mapping) alive for as long
// as the model exists; on CUDA the backend copies each tensor to VRAM once.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "bindings/array_check.h"
#include "common/formats.h"
#include "model/tensors.h"

namespace mq::bind {

inline TensorMap tensor_map_from_py(const pybind11::dict& tensors, Backend& be) {
    TensorMap tm;
    for (auto item : tensors) {
        const std::string name = pybind11::str(item.first);
        pybind11::array arr;
        int type_id = 0;
        std::vector<int64_t> shape;
        try {
            auto tup = item.second.cast<pybind11::tuple>();
            require(tup.size() == 3, "tensor '" + name + "': expected (array, ggml_type, shape)");
            arr = tup[0].cast<pybind11::array>();
            type_id = tup[1].cast<int>();
            shape = tup[2].cast<std::vector<int64_t>>();
        } catch (const pybind11::cast_error&) {  // a ValueError naming the tensor, not RuntimeError
            throw std::invalid_argument("tensor '" + name + "': expected (array, ggml_type int, shape tuple)");
        }
        require_c_contiguous(arr, ("tensor '" + name + "'").c_str());
        require(is_supported_type(type_id),
                "tensor '" + name + "' has unsupported ggml type " + std::to_string(type_id));
        require(!shape.empty(), "tensor '" + name + "' has an empty shape");
        const DType t = static_cast<DType>(type_id);
        int64_t rows = 1;
        for (size_t i = 0; i + 1 < shape.size(); i++) {
            require(shape[i] >= 0, "tensor '" + name + "' has a negative extent");
            rows = checked_mul(rows, shape[i], "tensor rows");
        }
        const int64_t cols = shape.back();
        const size_t expect = checked_bytes(rows, row_size(t, cols), "tensor bytes");
        require(size_t(arr.nbytes()) == expect, "tensor '" + name + "' has " + std::to_string(arr.nbytes()) +
                                                    " bytes, expected " + std::to_string(expect) + " for shape " +
                                                    TensorMap::fmt(shape) + " of " + type_info(t).name);
        NamedTensor nt;
        nt.w = be.upload(arr.data(), t, rows, cols);
        nt.host = arr.data();
        nt.shape = std::move(shape);
        tm.add(name, std::move(nt));
    }
    return tm;
}

}  // namespace mq::bind
