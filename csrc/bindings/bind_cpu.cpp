// CPU matmul, CPU path selection and the thread pool, for tests and benchmarks.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <chrono>
#include <ctime>
#include <vector>

#include "backend/backend.h"
#include "bindings/array_check.h"
#include "bindings/bindings.h"
#include "bindings/sample_params_py.h"
#include "common/profile.h"
#include "common/threadpool.h"
#include "cpu/attention_flash.h"
#include "cpu/matmul.h"
#include "cpu/sampling.h"

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
        require(ti.weight, std::string(ti.name) + " is an activation format, not a weight type");
        const size_t rs = row_size(ti.type, k);  // throws if k is not a multiple of the block
        const size_t expect = checked_bytes(n, rs, "w bytes");
        require(static_cast<size_t>(w.nbytes()) == expect,
                "w has " + std::to_string(w.nbytes()) + " bytes, expected " + std::to_string(expect) +
                    " for N=" + std::to_string(n) + " rows of K=" + std::to_string(k) + " " + wtype + " values");
        return ti.type;
    };

    auto parse_route = [](const std::string& route) {
        require(route == "auto" || route == "tiles" || route == "panel",
                "route must be 'auto', 'tiles' or 'panel' (got '" + route + "')");
        return route == "tiles" ? cpu::Route::Tiles : route == "panel" ? cpu::Route::Panel : cpu::Route::Auto;
    };

    m.def(
        "matmul",
        [check, parse_route](py::array x, py::array w, const std::string& wtype, int64_t n, int64_t k,
                             const std::string& route) {
            const DType t = check(x, w, wtype, n, k);
            const cpu::Route r = parse_route(route);
            const int64_t M = x.shape(0);
            checked_mul(M, n, "matmul output [M, N]");
            py::array_t<float> y({M, n});
            if (M == 0 || n == 0) return y;
            const float* xp = static_cast<const float*>(x.data());
            const void* wp = w.data();
            float* yp = y.mutable_data();
            {
                py::gil_scoped_release nogil;
                cpu::matmul(xp, M, k, k, wp, t, n, yp, n, ThreadPool::global(), r);
            }
            return y;
        },
        py::arg("x"), py::arg("w"), py::arg("wtype"), py::arg("n"), py::arg("k"), py::arg("route") = "auto",
        "Y[M,N] = X[M,K] · Wᵀ with W given as GGUF bytes of N rows of K values. route: 'auto' (by M), "
        "'tiles' (the per-row kernels) or 'panel' (the panel GEMM) for any M (cpu::Route).");

    m.def(
        "bench_matmul",
        [check, parse_route](py::array x, py::array w, const std::string& wtype, int64_t n, int64_t k, int iters,
                             bool cpu_time, const std::string& route) {
            const DType t = check(x, w, wtype, n, k);
            const cpu::Route r = parse_route(route);
            require(iters >= 1, "iters must be >= 1");
            const int64_t M = x.shape(0);
            std::vector<float> y(static_cast<size_t>(checked_mul(M, n, "matmul output [M, N]")));
            std::vector<double> times;
            const float* xp = static_cast<const float*>(x.data());
            const void* wp = w.data();
            {
                py::gil_scoped_release nogil;
                // cpu_time: CPU seconds of the whole process (all threads) instead of
                // wall time; with one thread this is immune to other processes.
                auto now = [cpu_time] {
                    if (cpu_time) return double(std::clock()) / CLOCKS_PER_SEC;
                    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
                };
                for (int it = 0; it < iters; it++) {
                    const double t0 = now();
                    cpu::matmul(xp, M, k, k, wp, t, n, y.data(), n, ThreadPool::global(), r);
                    times.push_back(now() - t0);
                }
            }
            return times;
        },
        py::arg("x"), py::arg("w"), py::arg("wtype"), py::arg("n"), py::arg("k"), py::arg("iters"),
        py::arg("cpu_time") = false, py::arg("route") = "auto",
        "Time `iters` calls of matmul (no Python in the loop); returns seconds per call "
        "(wall clock, or process CPU time with cpu_time=True).");

    m.def(
        "bench_attention",
        [](py::array q, py::array k, py::array v, float scale, int iters) {
            // The CPU backend's attention on the arrays in place (Backend.attention
            // copies its inputs into fresh buffers per call, which would dominate).
            require_dtype<float>(q, "q", "float32");
            require(q.ndim() == 3 && k.ndim() == 3 && v.ndim() == 3, "q, k, v must be 3-D");
            require_c_contiguous(q, "q");
            require_c_contiguous(k, "k");
            require_c_contiguous(v, "v");
            require(k.itemsize() == v.itemsize() && (k.itemsize() == 4 || k.itemsize() == 2),
                    "k and v must both be float32 or both float16");
            const int64_t nq = q.shape(0), nk = k.shape(0);
            const int n_head = dim_int(q, 1, "q n_head"), hd = dim_int(q, 2, "q head_dim"),
                      n_kv = dim_int(k, 1, "k n_kv_head");
            require(k.shape(2) == hd && v.shape(0) == nk && v.shape(1) == n_kv && v.shape(2) == hd,
                    "k/v shape mismatch");
            require(n_head > 0 && n_kv > 0 && hd > 0 && nk > 0 && n_head % n_kv == 0,
                    "need n_head, n_kv_head, head_dim and the key count > 0, n_head a multiple of n_kv_head");
            require(iters > 0, "iters must be positive");
            auto be = make_cpu_backend(ThreadPool::global());
            std::vector<float> out(size_t(nq) * n_head * hd);
            py::gil_scoped_release nogil;
            const DType kvt = k.itemsize() == 4 ? DType::F32 : DType::F16;
            auto call = [&] {
                be->attention(static_cast<const float*>(q.data()), k.data(), v.data(), kvt, int64_t(n_kv) * hd,
                              out.data(), nq, nk, n_head, n_kv, hd, scale, nullptr, 0, false, 0);
            };
            call();  // warm-up
            const auto t0 = std::chrono::steady_clock::now();
            for (int i = 0; i < iters; i++) call();
            return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
        },
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("iters") = 10,
        "Time `iters` calls of the CPU backend's attention on the given arrays (no copies); seconds per call.");

    m.def(
        "measure_read_bandwidth",
        [](double gib, int repeats) {
            require(gib > 0 && gib <= 64, "gib must be in (0, 64]");
            py::gil_scoped_release nogil;
            return cpu::measure_read_bandwidth(static_cast<size_t>(gib * (1ull << 30)), repeats, ThreadPool::global());
        },
        py::arg("gib") = 1.0, py::arg("repeats") = 5,
        "Memory read bandwidth (bytes/s): all pool threads sum a `gib` GiB buffer; best of `repeats`.");

    // Test hooks: activation bytes as the kernels of a path make them.
    auto parse = [](const std::string& path) { return cpu::path_by_name(path); };
    m.def(
        "quantize_q8_K_path",
        [parse](py::array x, const std::string& path) {
            require_dtype<float>(x, "x", "float32");
            require_c_contiguous(x, "x");
            require(x.ndim() == 1 && x.shape(0) % QK_K == 0, "x must be 1-D with a multiple of 256 values");
            const int64_t k = x.shape(0);
            py::array_t<uint8_t> out(static_cast<py::ssize_t>(k / QK_K * sizeof(block_q8_K)));
            cpu::quantize_row_q8_K_path(static_cast<const float*>(x.data()),
                                        reinterpret_cast<block_q8_K*>(out.mutable_data()), k, parse(path));
            return out;
        },
        py::arg("x"), py::arg("path"), "Q8_K activation bytes as the kernels of `path` make them (test hook).");
    m.def(
        "quantize_q8_0_path",
        [parse](py::array x, const std::string& path) {
            require_dtype<float>(x, "x", "float32");
            require_c_contiguous(x, "x");
            require(x.ndim() == 1 && x.shape(0) % QK8_0 == 0, "x must be 1-D with a multiple of 32 values");
            const int64_t k = x.shape(0);
            py::array_t<uint8_t> out(static_cast<py::ssize_t>(k / QK8_0 * sizeof(block_q8_0)));
            cpu::quantize_row_q8_0_path(static_cast<const float*>(x.data()),
                                        reinterpret_cast<block_q8_0*>(out.mutable_data()), k, parse(path));
            return out;
        },
        py::arg("x"), py::arg("path"), "Q8_0 activation bytes as the kernels of `path` make them (test hook).");

    // The CPU sampler's distribution (csrc/cpu/sampling.h), for the tests that
    // compare it with transformers' logits processors.
    m.def(
        "sample_probs",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> logits,
           py::array_t<int32_t, py::array::c_style | py::array::forcecast> history, py::tuple params) {
            require(logits.ndim() == 1 && logits.size() > 0, "logits must be a non-empty 1-D array");
            Backend::SampleParams p = sample_params_from(params);
            p.hist_begin = 0;
            p.hist_len = int32_t(history.size());
            Backend::check(p);
            cpu::SampleScratch sc;
            std::vector<int32_t> ids;
            std::vector<float> probs;
            cpu::sample_distribution(logits.data(), logits.size(), p, history.data(), sc, ids, probs);
            py::array_t<float> out(logits.size());
            std::fill(out.mutable_data(), out.mutable_data() + out.size(), 0.0f);
            for (size_t i = 0; i < ids.size(); i++) out.mutable_data()[ids[i]] = probs[i];
            return out;
        },
        py::arg("logits"), py::arg("history"), py::arg("params"),
        "Sampling distribution f32 [V] of the CPU sampler; params (temperature, top_k, top_p, min_p, "
        "repetition_penalty, u).");
    m.def(
        "avxvnni_evex_build",
        [] {
#if defined(MQ_AVXVNNI_EVEX)
            return true;
#else
            return false;
#endif
        },
        "True only in the developer check build (CMake MLLAMA_Q_AVXVNNI_EVEX): the avxvnni path built "
        "EVEX-encoded, so AVX-512 VNNI CPUs run it.");
    m.def("cpu_features", [] {
        const auto& f = cpu::cpu_features();
        py::dict d;
        d["avx2"] = f.avx2;
        d["fma"] = f.fma;
        d["f16c"] = f.f16c;
        d["avx512f"] = f.avx512f;
        d["avx512bw"] = f.avx512bw;
        d["avx512vl"] = f.avx512vl;
        d["avx512dq"] = f.avx512dq;
        d["avx512vnni"] = f.avx512vnni;
        d["avx512bf16"] = f.avx512bf16;
        d["avxvnni"] = f.avxvnni;
        d["amx"] = f.amx;
        d["amx_bf16"] = f.amx_bf16;
        d["amd"] = f.amd;
        return d;
    });
    m.def("w_prefetch_bytes", &cpu::w_prefetch_bytes,
          "How far ahead (bytes) the decode tiles prefetch the weights: 8192 on AMD (Zen), 2048 elsewhere "
          "(csrc/cpu/matmul.cpp default_w_prefetch).");

    m.def("amx_attention", &cpu::amx_attention_supported, py::arg("hd"),
          "True when the amx path's flash attention runs head size hd on AMX-BF16 tiles on this CPU and build "
          "(csrc/cpu/attention_flash_amx.cpp); otherwise the amx path takes the AVX-512 kernel.");
    // Opt-in per-op profiler (common/profile.h), for bench/vision_profile.py.
    m.def(
        "profile_enable",
        [](bool on, const std::string& clock) {
            require(clock == "wall" || clock == "thread_cpu",
                    "clock must be 'wall' or 'thread_cpu', got '" + clock + "'");
            prof::set_clock(clock == "wall" ? prof::Clock::Wall : prof::Clock::ThreadCpu);
            prof::set_enabled(on);
        },
        py::arg("on") = true, py::arg("clock") = "wall",
        "Turn the per-op profiler on or off (also MLLAMA_Q_PROFILE=1 at start). clock: 'wall', or "
        "'thread_cpu' (the calling thread's CPU time: immune to other processes, the whole op cost "
        "only with one thread).");
    m.def("profile_enabled", &prof::enabled);
    m.def("profile_reset", &prof::reset, "Clear the profiler's entries.");
    m.def(
        "profile_report",
        [] {
            py::list out;
            for (const prof::Entry& e : prof::snapshot()) {
                py::dict d;
                d["region"] = e.region;
                d["op"] = e.op;
                d["detail"] = e.detail;
                d["calls"] = e.calls;
                d["seconds"] = e.seconds;
                d["flop"] = e.flop;
                d["bytes"] = e.bytes;
                out.append(d);
            }
            return out;
        },
        "Profiler entries: list of {region, op, detail, calls, seconds, flop, bytes} (ops named 'x:y' are "
        "phases of op x, already inside its time).");

    m.def("cpu_path", [] { return std::string(cpu::path_name(cpu::active_path())); });
    m.def("set_cpu_path", &cpu::set_cpu_path, py::arg("name"),
          "Force a kernel path: 'auto', 'scalar', 'avx2', 'avxvnni', 'avx512' or 'amx'.");
    m.def("cpu_paths", &cpu::available_paths, "Kernel paths this CPU can run.");
    m.def("num_threads", [] { return ThreadPool::global().size(); });
    m.def("set_num_threads", &ThreadPool::set_global_threads, py::arg("n"), py::call_guard<py::gil_scoped_release>(),
          "Resize the global thread pool (n <= 0: one per available CPU; at most 1024). Safe while other threads "
          "run kernels: it waits for the parallel loop in progress (if any) and every later loop uses n threads.");
}

}  // namespace mq::bind
