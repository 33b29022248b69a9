// CPU matmul, CPU path selection and the thread pool, for tests and benchmarks.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <chrono>

#include "bindings/array_check.h"
#include "bindings/bindings.h"
#include "common/threadpool.h"
#include "cpu/matmul.h"

namespace py = pybind11;

namespace mq::bind {

void register_cpu(py::module_& m) {
    // Checks shared by matmul and bench_matmul; returns the weight type.
    auto check = [](const py::array& x, const py::array& w, const std::string& wtype, int64_t n, int64_t k) {
        require_dtype<float>(x, "x", "float32");
        require(x.ndim() == 2, "x must be 2-D [M, K], got " + std::to_string(x.ndim()) + " dimensions");
        require_c_contiguous(x, "x");
        require_c_contiguous(w, "w");
        require(n >= 0 && k > 0, "need n >= 0 and k > 0");
        require(x.shape(1) == k, "x has " + std::to_string(x.shape(1)) + " columns, expected K=" + std::to_string(k));
        const TypeInfo& ti = type_info_by_name(wtype.c_str());
        require(ti.type != DType::Q8_K, "q8_k is an activation format, not a weight type");
        const size_t rs = row_size(ti.type, k);   // throws if k is not a multiple of the block
        require(static_cast<size_t>(w.nbytes()) == rs * static_cast<size_t>(n),
                "w has " + std::to_string(w.nbytes()) + " bytes, expected " + std::to_string(rs * n) +
                    " for N=" + std::to_string(n) + " rows of K=" + std::to_string(k) + " " + wtype + " values");
        return ti.type;
    };

    m.def(
        "matmul",
        [check](py::array x, py::array w, const std::string& wtype, int64_t n, int64_t k) {
            const DType t = check(x, w, wtype, n, k);
            const int64_t M = x.shape(0);
            py::array_t<float> y({M, n});
            const float* xp = static_cast<const float*>(x.data());
            const void* wp = w.data();
            float* yp = y.mutable_data();
            {
                py::gil_scoped_release nogil;
                cpu::matmul(xp, M, k, k, wp, t, n, yp, n, ThreadPool::global());
            }
            return y;
        },
        py::arg("x"), py::arg("w"), py::arg("wtype"), py::arg("n"), py::arg("k"),
        "Y[M,N] = X[M,K] · Wᵀ with W given as GGUF bytes of N rows of K values.");

    m.def(
        "bench_matmul",
        [check](py::array x, py::array w, const std::string& wtype, int64_t n, int64_t k, int iters) {
            const DType t = check(x, w, wtype, n, k);
            require(iters >= 1, "iters must be >= 1");
            const int64_t M = x.shape(0);
            std::vector<float> y(static_cast<size_t>(M * n));
            std::vector<double> times;
            const float* xp = static_cast<const float*>(x.data());
            const void* wp = w.data();
            {
                py::gil_scoped_release nogil;
                for (int it = 0; it < iters; it++) {
                    const auto t0 = std::chrono::steady_clock::now();
                    cpu::matmul(xp, M, k, k, wp, t, n, y.data(), n, ThreadPool::global());
                    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
                }
            }
            return times;
        },
        py::arg("x"), py::arg("w"), py::arg("wtype"), py::arg("n"), py::arg("k"), py::arg("iters"),
        "Time `iters` calls of matmul (no Python in the loop); returns seconds per call.");

    m.def(
        "measure_read_bandwidth",
        [](double gib, int repeats) {
            require(gib > 0 && gib <= 64, "gib must be in (0, 64]");
            py::gil_scoped_release nogil;
            return cpu::measure_read_bandwidth(static_cast<size_t>(gib * (1ull << 30)), repeats, ThreadPool::global());
        },
        py::arg("gib") = 1.0, py::arg("repeats") = 5,
        "Memory read bandwidth (bytes/s): all pool threads sum a `gib` GiB buffer; best of `repeats`.");

    m.def("cpu_features", [] {
        const auto& f = cpu::cpu_features();
        py::dict d;
        d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c;
        d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw; d["avx512vl"] = f.avx512vl;
        d["avx512dq"] = f.avx512dq; d["avx512vnni"] = f.avx512vnni; d["avx512bf16"] = f.avx512bf16;
        d["avxvnni"] = f.avxvnni;
        return d;
    });

    m.def("cpu_path", [] { return std::string(cpu::path_name(cpu::active_path())); });
    m.def("set_cpu_path", &cpu::set_cpu_path, py::arg("name"),
          "Force a kernel path: 'auto', 'scalar', 'avx2' or 'avx512'.");
    m.def("cpu_paths", &cpu::available_paths, "Kernel paths this CPU can run.");
    m.def("num_threads", [] { return ThreadPool::global().size(); });
    m.def("set_num_threads", &ThreadPool::set_global_threads, py::arg("n"),
          "Resize the global thread pool (n <= 0: one per available CPU).");
}

}  // namespace mq::bind
