// Backend test binding: `_core.Backend("cpu" | "cuda")` exposes every op of
// the Backend interface on numpy arrays. Each call copies its inputs into
// backend memory, runs the op, synchronises and copies the result back. It is
// for tests (CUDA vs CPU, CPU vs numpy/torch) and micro-benchmarks, not for the
// model, which keeps its activations on the backend.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <limits>
#include <memory>
#include <string>

#include "backend/backend.h"
#include "bindings/array_check.h"
#include "bindings/bindings.h"
#include "bindings/sample_params_py.h"
#include "common/threadpool.h"

namespace py = pybind11;

namespace mq::bind {
namespace {

// Backend memory that frees itself.
struct DevBuf {
    Backend* be;
    void* p;
    DevBuf(Backend* b, size_t bytes) : be(b), p(b->alloc(bytes)) {}
    ~DevBuf() { be->free(p); }
    DevBuf(const DevBuf&) = delete;
    DevBuf& operator=(const DevBuf&) = delete;
    float* f() const { return static_cast<float*>(p); }
};

py::array_t<float> f32_array(py::array a, const char* what) {
    require_dtype<float>(a, what, "float32");
    require_c_contiguous(a, what);
    return py::array_t<float>(a);
}

class PyBackend {
public:
    explicit PyBackend(const std::string& name, int device) {
        if (name == "cpu") be_ = make_cpu_backend(ThreadPool::global());
        else if (name == "cuda") be_ = make_cuda_backend(device);
        else throw std::invalid_argument("unknown backend '" + name + "' (expected 'cpu' or 'cuda')");
    }
    std::string name() const { return be_->name(); }

    std::unique_ptr<DevBuf> upload(const py::array& a) {
        auto b = std::make_unique<DevBuf>(be_.get(), std::max<size_t>(a.nbytes(), 1));
        if (a.nbytes()) be_->to_device(b->p, a.data(), a.nbytes());
        return b;
    }
    py::array_t<float> download(const DevBuf& b, std::vector<py::ssize_t> shape) {
        py::array_t<float> out(shape);
        be_->synchronize();
        if (out.nbytes()) be_->to_host(out.mutable_data(), b.p, out.nbytes());
        return out;
    }

    py::array_t<float> matmul(py::array x, py::array w, const std::string& wtype, int64_t n, int64_t k,
                              std::optional<py::array> bias) {
        auto xf = f32_array(x, "x");
        require(n >= 0 && k > 0, "need n >= 0 and k > 0");
        require(xf.ndim() == 2 && xf.shape(1) == k, "x must be [M, K]");
        require_c_contiguous(w, "w");
        const TypeInfo& ti = type_info_by_name(wtype.c_str());
        require(size_t(w.nbytes()) == checked_bytes(n, row_size(ti.type, k), "w bytes"),
                "w byte count does not match N rows of K values");
        const int64_t M = xf.shape(0);
        const int64_t n_out = checked_mul(M, n, "matmul output [M, N]");
        Weight W = be_->upload(w.data(), ti.type, n, k);
        auto dx = upload(xf);
        std::unique_ptr<DevBuf> db;
        if (bias) {
            auto bf = f32_array(*bias, "bias");
            require(bf.size() == n, "bias must have N elements");
            db = upload(bf);
        }
        DevBuf dy(be_.get(), checked_bytes(std::max<int64_t>(n_out, 1), sizeof(float), "matmul output bytes"));
        if (n_out > 0) {
            py::gil_scoped_release nogil;
            be_->matmul(dx->f(), M, k, W, db ? db->f() : nullptr, dy.f(), n);
        }
        auto out = download(dy, {M, n});
        release_weight(W, w.data());
        return out;
    }

    py::array_t<float> get_rows(py::array table, const std::string& type, int64_t rows, int64_t cols, py::array ids) {
        require_c_contiguous(table, "table");
        require(rows >= 0 && cols >= 0, "rows and cols must be non-negative");
        const TypeInfo& ti = type_info_by_name(type.c_str());
        require(size_t(table.nbytes()) == checked_bytes(rows, row_size(ti.type, cols), "table bytes"),
                "table byte count mismatch");
        auto id32 = int32_checked(ids, "ids", 0, rows - 1);  // every id a row of the table
        const int64_t n = id32.size();
        const int64_t n_out = checked_mul(n, cols, "get_rows output [n_ids, cols]");
        Weight W = be_->upload(table.data(), ti.type, rows, cols);
        auto dids = upload(id32);  // checked on the host above: a device backend cannot check them
        DevBuf out(be_.get(), checked_bytes(std::max<int64_t>(n_out, 1), sizeof(float), "get_rows output bytes"));
        if (n_out > 0) be_->get_rows(W, static_cast<const int32_t*>(dids->p), n, out.f());
        auto r = download(out, {n, cols});
        release_weight(W, table.data());
        return r;
    }

    py::array_t<float> rms_norm(py::array x, py::array w, float eps) {
        auto xf = f32_array(x, "x"), wf = f32_array(w, "w");
        require(xf.ndim() == 2 && wf.size() == xf.shape(1), "x must be [rows, cols] and w [cols]");
        auto dx = upload(xf), dw = upload(wf);
        DevBuf dy(be_.get(), std::max<size_t>(xf.nbytes(), 4));
        be_->rms_norm(dx->f(), dw->f(), dy.f(), xf.shape(0), xf.shape(1), eps);
        return download(dy, {xf.shape(0), xf.shape(1)});
    }

    py::array_t<float> layer_norm(py::array x, py::array w, py::array b, float eps) {
        auto xf = f32_array(x, "x"), wf = f32_array(w, "w"), bf = f32_array(b, "b");
        require(xf.ndim() == 2 && wf.size() == xf.shape(1) && bf.size() == xf.shape(1),
                "x must be [rows, cols], w and b [cols]");
        auto dx = upload(xf), dw = upload(wf), dbb = upload(bf);
        DevBuf dy(be_.get(), std::max<size_t>(xf.nbytes(), 4));
        be_->layer_norm(dx->f(), dw->f(), dbb->f(), dy.f(), xf.shape(0), xf.shape(1), eps);
        return download(dy, {xf.shape(0), xf.shape(1)});
    }

    // Binary/unary elementwise ops share one shape check.
    py::array_t<float> elementwise(const std::string& op, py::array a, std::optional<py::array> b, float s) {
        auto af = f32_array(a, "a");
        std::vector<py::ssize_t> shape(af.shape(), af.shape() + af.ndim());
        auto da = upload(af);
        const int64_t n = af.size();
        std::unique_ptr<DevBuf> dbb;
        if (b) {
            auto bf = f32_array(*b, "b");
            require(bf.size() == n, "a and b must have the same number of elements");
            dbb = upload(bf);
        }
        if (op == "add") {
            require(bool(dbb), "add needs b");
            be_->add(da->f(), dbb->f(), n);
        } else if (op == "add_scaled") {
            require(bool(dbb), "add_scaled needs b");
            be_->add_scaled(da->f(), dbb->f(), s, n);
        } else if (op == "silu_mul") {
            require(bool(dbb), "silu_mul needs b");
            be_->silu_mul(da->f(), dbb->f(), da->f(), n);
        } else if (op == "gelu") be_->gelu(da->f(), n);
        else throw std::invalid_argument("unknown elementwise op " + op);
        return download(*da, shape);
    }

    py::array_t<float> rope(py::array x, py::array pos, py::array inv_freq) {
        auto xf = f32_array(x, "x"), ff = f32_array(inv_freq, "inv_freq");
        require(xf.ndim() == 3, "x must be [n_tok, n_head, head_dim]");
        auto p32 = int32_checked(pos, "pos", 0, std::numeric_limits<int32_t>::max());
        require(p32.size() == xf.shape(0), "pos must have n_tok entries");
        require(ff.size() * 2 == xf.shape(2), "inv_freq must have head_dim/2 entries");
        const int n_head = dim_int(xf, 1, "x n_head"), hd = dim_int(xf, 2, "x head_dim");
        auto dx = upload(xf), dpos = upload(p32), dinv = upload(ff);
        if (xf.size() > 0) be_->rope(dx->f(), xf.shape(0), n_head, hd, static_cast<const int32_t*>(dpos->p), dinv->f());
        return download(*dx, {xf.shape(0), xf.shape(1), xf.shape(2)});
    }

    // q: [nq, n_head, hd] f32; k, v: [nk, n_kv_head, hd] f32 or f16 (uint16 bits or float16)
    py::array_t<float> attention(py::array q, py::array k, py::array v, float scale, std::optional<py::array> mask,
                                 bool causal, int64_t q_offset) {
        auto qf = f32_array(q, "q");
        require(qf.ndim() == 3 && k.ndim() == 3 && v.ndim() == 3, "q, k, v must be 3-D");
        require_c_contiguous(k, "k");
        require_c_contiguous(v, "v");
        require(k.itemsize() == v.itemsize() && (k.itemsize() == 4 || k.itemsize() == 2),
                "k and v must both be float32 or both float16");
        const DType kvt = k.itemsize() == 4 ? DType::F32 : DType::F16;
        const int64_t nq = qf.shape(0), nk = k.shape(0);
        const int n_head = dim_int(qf, 1, "q n_head"), hd = dim_int(qf, 2, "q head_dim"),
                  n_kv = dim_int(k, 1, "k n_kv_head");
        require(k.shape(2) == hd && v.shape(0) == nk && v.shape(1) == n_kv && v.shape(2) == hd, "k/v shape mismatch");
        require(n_head > 0 && n_kv > 0 && hd > 0 && n_head % n_kv == 0,
                "need n_head, n_kv_head, head_dim > 0 and n_head a multiple of n_kv_head");
        require(nk > 0, "attention needs at least one key");
        auto dq = upload(qf), dk = upload(k), dv = upload(v);
        std::unique_ptr<DevBuf> dm;
        if (mask) {
            auto mf = f32_array(*mask, "mask");
            require(mf.ndim() == 2 && mf.shape(0) == nq && mf.shape(1) == nk, "mask must be [nq, nk]");
            dm = upload(mf);
        }
        DevBuf out(be_.get(), std::max<size_t>(qf.nbytes(), 4));
        {
            py::gil_scoped_release nogil;
            be_->attention(dq->f(), dk->p, dv->p, kvt, int64_t(n_kv) * hd, out.f(), nq, nk, n_head, n_kv, hd, scale,
                           dm ? dm->f() : nullptr, nk, causal, q_offset);
        }
        return download(out, {nq, n_head, hd});
    }

    py::array store_rows_f16(py::array src) {
        auto sf = f32_array(src, "src");
        require(sf.ndim() == 2, "src must be [n, width]");
        auto ds = upload(sf);
        DevBuf dd(be_.get(), std::max<int64_t>(sf.size(), 1) * 2);
        be_->store_rows(ds->f(), dd.p, DType::F16, sf.shape(0), sf.shape(1), sf.shape(1), nullptr);
        py::array_t<uint16_t> out({sf.shape(0), sf.shape(1)});
        be_->synchronize();
        if (out.nbytes()) be_->to_host(out.mutable_data(), dd.p, out.nbytes());
        return out;
    }

    // Backend::attention_segments over numpy: q [nq, n_head, hd] f32; per segment
    // (q_row, n_q, k [n_k, n_kv, hd], v, q_offset, causal) with f32 or f16 K/V.
    py::array_t<float> attention_segments(py::array q, py::list segments, float scale) {
        auto qf = f32_array(q, "q");
        require(qf.ndim() == 3, "q must be [nq, n_head, hd]");
        const int64_t nq = qf.shape(0);
        const int n_head = int(qf.shape(1)), hd = int(qf.shape(2));
        auto dq = upload(qf);
        std::vector<std::unique_ptr<DevBuf>> bufs;
        std::vector<Backend::AttnSegment> segs;
        int n_kv = -1, esize = 0;
        for (auto item : segments) {
            auto t = item.cast<py::tuple>();
            require(t.size() == 6, "segments are (q_row, n_q, k, v, q_offset, causal)");
            py::array k = t[2].cast<py::array>(), v = t[3].cast<py::array>();
            require_c_contiguous(k, "k");
            require_c_contiguous(v, "v");
            require(k.ndim() == 3 && v.ndim() == 3 && k.shape(2) == hd && v.shape(0) == k.shape(0) &&
                        v.shape(1) == k.shape(1) && v.shape(2) == hd,
                    "k/v must be [n_k, n_kv_head, hd]");
            require(k.itemsize() == v.itemsize() && (k.itemsize() == 4 || k.itemsize() == 2), "k/v must be f32 or f16");
            require(n_kv < 0 || (n_kv == int(k.shape(1)) && esize == int(k.itemsize())),
                    "segments must share K/V shape and type");
            n_kv = int(k.shape(1));
            esize = int(k.itemsize());
            Backend::AttnSegment g;
            g.q_row = t[0].cast<int64_t>();
            g.n_q = t[1].cast<int64_t>();
            require(g.q_row >= 0 && g.n_q >= 0 && g.q_row + g.n_q <= nq, "segment rows out of range");
            bufs.push_back(upload(k));
            g.k = bufs.back()->p;
            bufs.push_back(upload(v));
            g.v = bufs.back()->p;
            g.n_k = k.shape(0);
            g.q_offset = t[4].cast<int64_t>();
            g.causal = t[5].cast<bool>() ? 1 : 0;
            segs.push_back(g);
        }
        require(!segs.empty(), "no segments");
        DevBuf out(be_.get(), std::max<size_t>(qf.nbytes(), 4));
        be_->copy(out.p, dq->p, qf.nbytes());  // rows no segment covers keep q (tests check they are untouched)
        {
            py::gil_scoped_release nogil;
            be_->attention_segments(dq->f(), out.f(), segs.data(), nullptr, int(segs.size()),
                                    esize == 4 ? DType::F32 : DType::F16, int64_t(n_kv) * hd, n_head, n_kv, hd, scale);
        }
        return download(out, {nq, n_head, hd});
    }

    // Backend::sample over numpy: logits [n, V] f32, one history (int32) and one
    // parameter tuple (temperature, top_k, top_p, min_p, repetition_penalty, u) per row.
    py::array_t<int32_t> sample(py::array logits, py::list histories, py::list params) {
        auto lf = f32_array(logits, "logits");
        require(lf.ndim() == 2, "logits must be [n_rows, vocab]");
        const int64_t n = lf.shape(0), V = lf.shape(1);
        require(int64_t(histories.size()) == n && int64_t(params.size()) == n,
                "one history and one parameter set per row");
        std::vector<int32_t> hist;
        std::vector<Backend::SampleParams> ps(static_cast<size_t>(n));
        for (int64_t r = 0; r < n; r++) {
            auto h = py::array_t<int32_t, py::array::c_style | py::array::forcecast>(histories[size_t(r)]);
            ps[size_t(r)] = sample_params_from(params[size_t(r)].cast<py::tuple>());
            ps[size_t(r)].hist_begin = int32_t(hist.size());
            ps[size_t(r)].hist_len = int32_t(h.size());
            hist.insert(hist.end(), h.data(), h.data() + h.size());
            Backend::check(ps[size_t(r)]);
        }
        auto dl = upload(lf);
        DevBuf dh(be_.get(), std::max<size_t>(hist.size(), 1) * 4),
            dp(be_.get(), ps.size() * sizeof(Backend::SampleParams));
        DevBuf di(be_.get(), size_t(n) * 4);
        if (!hist.empty()) be_->to_device(dh.p, hist.data(), hist.size() * 4);
        be_->to_device(dp.p, ps.data(), ps.size() * sizeof(Backend::SampleParams));
        {
            py::gil_scoped_release nogil;
            be_->sample(dl->f(), n, V, static_cast<const Backend::SampleParams*>(dp.p),
                        static_cast<const int32_t*>(dh.p), static_cast<int32_t*>(di.p));
        }
        py::array_t<int32_t> out(n);
        be_->synchronize();
        be_->to_host(out.mutable_data(), di.p, size_t(n) * 4);
        return out;
    }

private:
    // Weights uploaded to a device backend are owned by it; the CPU backend's
    // are views. Nothing to do for either here: device weights live until the
    // backend is destroyed (the test binding is short-lived).
    void release_weight(const Weight&, const void*) {}

    std::unique_ptr<Backend> be_;
};

}  // namespace

void register_backend(py::module_& m) {
    py::class_<PyBackend>(m, "Backend", "Test binding over one compute backend ('cpu' or 'cuda').")
        .def(py::init<const std::string&, int>(), py::arg("name") = "cpu", py::arg("device") = 0)
        .def_property_readonly("name", &PyBackend::name)
        .def("matmul", &PyBackend::matmul, py::arg("x"), py::arg("w"), py::arg("wtype"), py::arg("n"), py::arg("k"),
             py::arg("bias") = py::none())
        .def("get_rows", &PyBackend::get_rows, py::arg("table"), py::arg("type"), py::arg("rows"), py::arg("cols"),
             py::arg("ids"))
        .def("rms_norm", &PyBackend::rms_norm, py::arg("x"), py::arg("w"), py::arg("eps"))
        .def("layer_norm", &PyBackend::layer_norm, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("eps"))
        .def("elementwise", &PyBackend::elementwise, py::arg("op"), py::arg("a"), py::arg("b") = py::none(),
             py::arg("s") = 0.0f)
        .def("rope", &PyBackend::rope, py::arg("x"), py::arg("pos"), py::arg("inv_freq"))
        .def("attention", &PyBackend::attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"),
             py::arg("mask") = py::none(), py::arg("causal") = false, py::arg("q_offset") = 0)
        .def("store_rows_f16", &PyBackend::store_rows_f16, py::arg("src"))
        .def("attention_segments", &PyBackend::attention_segments, py::arg("q"), py::arg("segments"), py::arg("scale"))
        .def("sample", &PyBackend::sample, py::arg("logits"), py::arg("histories"), py::arg("params"),
             "One sampled id per logits row (params: (temperature, top_k, top_p, min_p, repetition_penalty, u)).");
}

}  // namespace mq::bind
