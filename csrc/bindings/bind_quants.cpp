// quantize / dequantize: row-parallel on the global thread pool, GIL released.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings/array_check.h"
#include "bindings/bindings.h"
#include "common/threadpool.h"
#include "quants/quants.h"

namespace py = pybind11;

namespace mq::bind {

namespace {
// Rows per task: enough work per task to amortise scheduling (~64K values).
int64_t rows_per_task(int64_t cols) { return cols >= 65536 ? 1 : 65536 / (cols > 0 ? cols : 1); }
}  // namespace

void register_quants(py::module_& m) {
    m.def(
        "quantize",
        [](py::array x, const std::string& type) {
            require_dtype<float>(x, "x", "float32");
            require_c_contiguous(x, "x");
            require(x.ndim() == 2, "x must be 2-D [rows, cols]");
            const TypeInfo& ti = type_info_by_name(type.c_str());
            const int64_t rows = x.shape(0), cols = x.shape(1);
            const size_t rs = row_size(ti.type, cols);
            py::array_t<uint8_t> out({rows, static_cast<int64_t>(rs)});
            if (rows == 0 || cols == 0) return out;  // nothing to do (a zero-size axis may sit beside a huge one)
            const float* src = static_cast<const float*>(x.data());
            uint8_t* dst = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                const int64_t per = rows_per_task(cols);
                ThreadPool::global().parallel_for((rows + per - 1) / per, [&](int64_t t, int) {
                    for (int64_t r = t * per; r < rows && r < (t + 1) * per; r++)
                        quantize_row(ti.type, src + r * cols, dst + r * rs, cols);
                });
            }
            return out;
        },
        py::arg("x"), py::arg("type"), "Quantize float32 [rows, cols] to GGUF blocks: uint8 [rows, row_bytes].");

    m.def(
        "dequantize",
        [](py::array data, const std::string& type, int64_t rows, int64_t cols) {
            require_c_contiguous(data, "data");
            const TypeInfo& ti = type_info_by_name(type.c_str());
            require(rows >= 0 && cols >= 0, "rows and cols must be non-negative");
            const size_t rs = row_size(ti.type, cols);
            const size_t expect = checked_bytes(rows, rs, "dequantize data bytes");
            require(static_cast<size_t>(data.nbytes()) == expect,
                    "data has " + std::to_string(data.nbytes()) + " bytes, expected " + std::to_string(expect) +
                        " for " + std::to_string(rows) + " rows of " + std::to_string(cols) + " " + type + " values");
            checked_mul(rows, cols, "dequantize output [rows, cols]");
            py::array_t<float> out({rows, cols});
            if (rows == 0 || cols == 0) return out;  // 2**40 rows of 0 values: no 2**40-step loop
            const uint8_t* src = static_cast<const uint8_t*>(data.data());
            float* dst = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                const int64_t per = rows_per_task(cols);
                ThreadPool::global().parallel_for((rows + per - 1) / per, [&](int64_t t, int) {
                    for (int64_t r = t * per; r < rows && r < (t + 1) * per; r++)
                        dequantize_row(ti.type, src + r * rs, dst + r * cols, cols);
                });
            }
            return out;
        },
        py::arg("data"), py::arg("type"), py::arg("rows"), py::arg("cols"),
        "Dequantize GGUF blocks (any dtype, C-contiguous bytes) to float32 [rows, cols].");

    m.def(
        "quant_path", [] { return std::string(quant_path()); },
        "Instruction set of the Q4_K/Q6_K quantizer searches (scalar|avx2).");
    m.def("set_quant_path", &set_quant_path, py::arg("name"),
          "Force the quantizer path: auto|scalar|avx2|avxvnni|avx512|amx (ValueError if unsupported). Same bytes on "
          "every "
          "path.");
    m.def("quant_paths", &quant_paths, "Quantizer paths this CPU can run.");
}

}  // namespace mq::bind
