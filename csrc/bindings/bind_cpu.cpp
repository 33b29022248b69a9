// CPU matmul, CPU path selection and the thread pool, for tests and benchmarks.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings/array_check.h"
#include "bindings/bindings.h"
#include "common/threadpool.h"
#include "cpu/matmul.h"

namespace py = pybind11;

namespace mq::bind {

void register_cpu(py::module_& m) {
    m.def(
        "matmul",
        [](py::array x, py::array w, const std::string& wtype, int64_t n, int64_t k) {
            require_dtype<float>(x, "x", "float32");
            require_c_contiguous(x, "x");
            require_c_contiguous(w, "w");
            require(x.ndim() == 2, "x must be 2-D [M, K]");
            require(x.shape(1) == k, "x has " + std::to_string(x.shape(1)) + " columns, expected K=" + std::to_string(k));
            const TypeInfo& ti = type_info_by_name(wtype.c_str());
            require(ti.type != DType::Q8_K, "q8_k is an activation format, not a weight type");
            const size_t rs = row_size(ti.type, k);
            require(static_cast<size_t>(w.nbytes()) == rs * static_cast<size_t>(n),
                    "w has " + std::to_string(w.nbytes()) + " bytes, expected " + std::to_string(rs * n) +
                        " for N=" + std::to_string(n) + " rows of K=" + std::to_string(k) + " " + wtype + " values");
            const int64_t M = x.shape(0);
            py::array_t<float> y({M, n});
            const float* xp = static_cast<const float*>(x.data());
            const void* wp = w.data();
            float* yp = y.mutable_data();
            {
                py::gil_scoped_release nogil;
                cpu::matmul(xp, M, k, k, wp, ti.type, n, yp, n, ThreadPool::global());
            }
            return y;
        },
        py::arg("x"), py::arg("w"), py::arg("wtype"), py::arg("n"), py::arg("k"),
        "Y[M,N] = X[M,K] · Wᵀ with W given as GGUF bytes of N rows of K values.");

    m.def("cpu_path", [] { return std::string(cpu::path_name(cpu::active_path())); });
    m.def("set_cpu_path", &cpu::set_cpu_path, py::arg("name"),
          "Force a kernel path: 'auto', 'scalar', 'avx2' or 'avx512'.");
    m.def("cpu_paths", &cpu::available_paths, "Kernel paths this CPU can run.");
    m.def("num_threads", [] { return ThreadPool::global().size(); });
    m.def("set_num_threads", &ThreadPool::set_global_threads, py::arg("n"),
          "Resize the global thread pool (n <= 0: one per available CPU).");
}

}  // namespace mq::bind
