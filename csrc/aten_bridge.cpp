// The only C++ in modelopt_c: extern "C" helpers over ATen that move tensor bytes.
// Every body runs inside ATB_TRY so that no C++ exception ever crosses into C;
// the C side decides what to copy, this file only does it.
#include "aten_bridge.h"

#include <ATen/ATen.h>
#include <ATen/DLConvertor.h>
#include <ATen/Context.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cstdio>
#include <cstring>
#include <atomic>
#include <exception>
#include <functional>
#include <memory>
#include <optional>

struct AtbTensor {
    at::Tensor t;
};

// One catch-all around every extern "C" body (PyTorch's
// AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE): any exception, std:: or not,
// becomes `value` returned to C, with the message in `err` when there is one.
static void atb_set_error(AtbError *err, const char *msg) {
    if (err != nullptr) std::snprintf(err->msg, sizeof(err->msg), "%s", msg);
}

#define ATB_TRY try {
#define ATB_CATCH_RETURN(err, value)                                          \
    }                                                                         \
    catch (const c10::Error &e) { /* its what() carries a C++ backtrace */    \
        atb_set_error((err), e.what_without_backtrace());                     \
        return (value);                                                       \
    }                                                                         \
    catch (const std::exception &e) {                                         \
        atb_set_error((err), e.what());                                       \
        return (value);                                                       \
    }                                                                         \
    catch (...) {                                                             \
        atb_set_error((err), "unknown C++ exception");                        \
        return (value);                                                       \
    }
#define ATB_CATCH(err) ATB_CATCH_RETURN(err, -1)
/* For functions that return nothing: there is nobody to tell. */
#define ATB_CATCH_VOID                                                        \
    }                                                                         \
    catch (...) {                                                             \
    }

// A release callback handed to ATen that only fires once "armed".  ATen may
// build the tensor's storage (with our deleter inside) and then throw while
// setting its sizes: unwinding runs the deleter.  Until the bridge function
// has succeeded the callback is disarmed, so on failure the caller's resource
// is never released behind its back and the caller still owns it (the
// documented contract); once armed, ATen owns it and releases it exactly once.
struct AtbArmedRelease {
    void (*release)(void *);
    void *ctx;
    std::atomic<bool> armed{false};
};

static std::function<void(void *)> atb_armed_deleter(const std::shared_ptr<AtbArmedRelease> &g) {
    return [g](void *) {
        if (g->armed.load()) g->release(g->ctx);
    };
}

static const struct {
    AtbDtype ours;
    at::ScalarType aten;
} kDtypes[] = {
    {ATB_BOOL, at::kBool},        {ATB_U8, at::kByte},          {ATB_I8, at::kChar},
    {ATB_I16, at::kShort},        {ATB_I32, at::kInt},          {ATB_I64, at::kLong},
    {ATB_U16, at::kUInt16},       {ATB_U32, at::kUInt32},       {ATB_U64, at::kUInt64},
    {ATB_F16, at::kHalf},         {ATB_BF16, at::kBFloat16},    {ATB_F32, at::kFloat},
    {ATB_F64, at::kDouble},       {ATB_F8_E4M3, at::kFloat8_e4m3fn},
    {ATB_F8_E5M2, at::kFloat8_e5m2},
};

static bool to_aten(AtbDtype d, at::ScalarType *out) {
    for (const auto &m : kDtypes) {
        if (m.ours == d) {
            *out = m.aten;
            return true;
        }
    }
    return false;
}

extern "C" {

int atb_from_dlpack(void *dl_managed, AtbTensor **out, AtbError *err) {
    auto *dlm = static_cast<DLManagedTensor *>(dl_managed);
    ATB_TRY
    auto handle = std::make_unique<AtbTensor>(); // allocated before ATen owns anything
    auto g = std::make_shared<AtbArmedRelease>();
    g->release = [](void *p) {
        auto *m = static_cast<DLManagedTensor *>(p);
        if (m->deleter) m->deleter(m);
    };
    g->ctx = dlm;
    handle->t = at::fromDLPack(dlm, atb_armed_deleter(g));
    g->armed.store(true); // from here the tensor owns dlm
    *out = handle.release();
    return 0;
    }
    catch (const c10::Error &e) {
        // fromDLPack threw: whatever it built has been destroyed disarmed, so dlm
        // is still ours; the contract says its deleter has run on failure.
        if (dlm != nullptr && dlm->deleter) dlm->deleter(dlm);
        atb_set_error(err, e.what_without_backtrace());
        return -1;
    }
    catch (const std::exception &e) {
        // fromDLPack threw: whatever it built has been destroyed disarmed, so dlm
        // is still ours; the contract says its deleter has run on failure.
        if (dlm != nullptr && dlm->deleter) dlm->deleter(dlm);
        atb_set_error(err, e.what());
        return -1;
    }
    catch (...) {
        if (dlm != nullptr && dlm->deleter) dlm->deleter(dlm);
        atb_set_error(err, "unknown C++ exception");
        return -1;
    }
}

int atb_to_dlpack(const AtbTensor *t, void **dl_managed_out, AtbError *err) {
    ATB_TRY
    *dl_managed_out = at::toDLPack(t->t);
    return 0;
    ATB_CATCH(err)
}

int atb_from_blob(void *data, AtbDtype dtype, const int64_t *sizes, int ndim,
                  void (*release)(void *ctx), void *ctx, AtbTensor **out, AtbError *err) {
    ATB_TRY
    at::ScalarType st;
    if (!to_aten(dtype, &st)) {
        std::snprintf(err->msg, sizeof(err->msg), "unsupported dtype code %d", (int)dtype);
        return -1;
    }
    auto opts = at::TensorOptions().dtype(st).device(at::kCPU);
    at::IntArrayRef shape(sizes, static_cast<size_t>(ndim));
    auto handle = std::make_unique<AtbTensor>(); // allocated before ATen owns anything
    auto g = std::make_shared<AtbArmedRelease>();
    g->release = release;
    g->ctx = ctx;
    // May throw after the storage (holding our deleter) exists, e.g. when the
    // strides of a zero-element shape overflow int64: the deleter then runs
    // disarmed, and ctx stays the caller's.
    handle->t = at::from_blob(data, shape, atb_armed_deleter(g), opts);
    g->armed.store(true); // nothing below throws: from here ATen owns ctx
    *out = handle.release();
    return 0;
    ATB_CATCH(err)
}

int atb_copy_into(AtbTensor *dst, const AtbTensor *src, AtbError *err) {
    ATB_TRY
    if (!dst->t.sizes().equals(src->t.sizes())) {
        std::snprintf(err->msg, sizeof(err->msg), "shape mismatch: the model has %s, the checkpoint has %s",
                      c10::str(dst->t.sizes()).c_str(), c10::str(src->t.sizes()).c_str());
        return -1;
    }
    dst->t.copy_(src->t);
    return 0;
    ATB_CATCH(err)
}

AtbDtype atb_dtype(const AtbTensor *t) {
    ATB_TRY
    if (t == nullptr) return ATB_DTYPE_INVALID;
    for (const auto &m : kDtypes) {
        if (m.aten == t->t.scalar_type()) return m.ours;
    }
    return ATB_DTYPE_INVALID;
    ATB_CATCH_RETURN(nullptr, ATB_DTYPE_INVALID)
}

int atb_ndim(const AtbTensor *t) {
    ATB_TRY
    if (t == nullptr) return -1;
    return static_cast<int>(t->t.dim());
    ATB_CATCH_RETURN(nullptr, -1)
}

int64_t atb_size(const AtbTensor *t, int dim) {
    ATB_TRY
    if (t == nullptr || dim < 0 || dim >= t->t.dim()) return -1;
    return t->t.size(dim);
    ATB_CATCH_RETURN(nullptr, -1)
}

int64_t atb_nbytes(const AtbTensor *t) {
    ATB_TRY
    if (t == nullptr) return -1;
    return static_cast<int64_t>(t->t.nbytes());
    ATB_CATCH_RETURN(nullptr, -1)
}

int atb_is_contiguous(const AtbTensor *t) {
    ATB_TRY
    if (t == nullptr) return -1;
    return t->t.is_contiguous() ? 1 : 0;
    ATB_CATCH_RETURN(nullptr, -1)
}

int atb_is_cpu(const AtbTensor *t) {
    ATB_TRY
    if (t == nullptr) return -1;
    return t->t.is_cpu() ? 1 : 0;
    ATB_CATCH_RETURN(nullptr, -1)
}

const void *atb_data(const AtbTensor *t) {
    ATB_TRY
    if (t == nullptr) return nullptr;
    return t->t.const_data_ptr();
    ATB_CATCH_RETURN(nullptr, nullptr)
}

int atb_host_contiguous(const AtbTensor *t, AtbTensor **host, AtbError *err) {
    ATB_TRY
    if (t->t.is_cpu() && t->t.is_contiguous()) {
        *host = new AtbTensor{t->t};
        return 0;
    }
    // a device tensor comes over as it lies (no contiguous copy of it on the device, no
    // page-locked buffer for a copy that is synchronous anyway), then is made contiguous here
    *host = new AtbTensor{t->t.to(at::kCPU).contiguous()};
    return 0;
    ATB_CATCH(err)
}

// Copy the elements [e0, e1) of `t`, counted in C (row-major) order, into `out`: a
// contiguous 1-D tensor of e1 - e0 elements of t's dtype on t's device.  Only those
// elements are touched: rows wholly inside the range are one narrow, the partial first
// and last rows recurse one dimension down, so at most 2 * dim + 1 copies are made and
// no temporary is larger than the range (a stride-0 / expanded tensor is read as what
// it shows, never materialised whole).
static void atb_gather_flat(const at::Tensor &t, int64_t e0, int64_t e1, const at::Tensor &out) {
    if (e0 >= e1 || t.numel() == 0) return;
    if (t.dim() == 0) {
        out.copy_(t.reshape({1}));
        return;
    }
    const int64_t inner = t.numel() / t.size(0); // elements per leading index
    const int64_t i0 = e0 / inner, i1 = (e1 - 1) / inner; // first and last rows touched
    if (i0 == i1 && (e0 % inner != 0 || e1 - e0 != inner)) {
        atb_gather_flat(t.select(0, i0), e0 - i0 * inner, e1 - i0 * inner, out);
        return;
    }
    int64_t pos = 0, whole0 = i0, whole1 = i1 + 1; // rows [whole0, whole1) are copied whole
    if (e0 % inner != 0) {                          // the first row, from e0 on
        const int64_t len = (i0 + 1) * inner - e0;
        atb_gather_flat(t.select(0, i0), e0 - i0 * inner, inner, out.narrow(0, 0, len));
        pos = len;
        whole0 = i0 + 1;
    }
    const bool tail = e1 % inner != 0;
    if (tail) whole1 = i1;
    if (whole1 > whole0) {
        const at::Tensor rows = t.narrow(0, whole0, whole1 - whole0);
        out.narrow(0, pos, rows.numel()).view(rows.sizes()).copy_(rows);
        pos += rows.numel();
    }
    if (tail) { // the last row, up to e1
        atb_gather_flat(t.select(0, i1), 0, e1 - i1 * inner, out.narrow(0, pos, e1 - i1 * inner));
    }
}

struct AtbStager {
    int64_t chunk;
    at::Tensor buf[2];                 // host buffers, `chunk` bytes each
    at::Tensor src[2];                 // the source of the copy in flight, kept alive
    std::optional<c10::Event> done[2]; // recorded after a device copy; empty for CPU
    const AtbTensor *key = nullptr;    // the tensor `image` was made from
    at::Tensor image;                  // its bytes, 1-D uint8, on its device: a view (contiguous
                                       // tensors only; undefined for the others)
};

int atb_stager_new(size_t chunk, int pinned, AtbStager **out, AtbError *err) {
    ATB_TRY
    auto s = std::make_unique<AtbStager>();
    s->chunk = static_cast<int64_t>(chunk);
    auto opts = at::TensorOptions().dtype(at::kByte).pinned_memory(pinned != 0);
    for (auto &b : s->buf) b = at::empty({s->chunk}, opts);
    *out = s.release();
    return 0;
    ATB_CATCH(err)
}

int atb_stager_start(AtbStager *s, int slot, const AtbTensor *t, int64_t off, int64_t n, AtbError *err) {
    ATB_TRY
    if (slot < 0 || slot > 1 || n < 0 || n > s->chunk) {
        std::snprintf(err->msg, sizeof(err->msg), "stager: bad slot %d or length %lld", slot, (long long)n);
        return -1;
    }
    if (s->key != t) {
        // a contiguous tensor is read where it lies; a non-contiguous one piece by piece
        // below (never a whole contiguous copy of it: on a GPU that is a second copy of it)
        s->image = t->t.is_contiguous() ? t->t.reshape({-1}).view(at::kByte) : at::Tensor();
        s->key = t;
    }
    const int64_t nbytes = static_cast<int64_t>(t->t.nbytes());
    if (off < 0 || off > nbytes || n > nbytes - off) {
        std::snprintf(err->msg, sizeof(err->msg), "stager: bytes [%lld, %lld) outside a tensor of %lld bytes",
                      (long long)off, (long long)(off + n), (long long)nbytes);
        return -1;
    }
    at::Tensor bytes;
    if (s->image.defined()) {
        bytes = s->image.narrow(0, off, n);
    }
    else {
        // the elements that bytes [off, off + n) of the C-contiguous image fall in (a piece
        // need not start or end on an element), gathered on t's device: at most n plus
        // two elements' bytes, however large the tensor
        const int64_t es = static_cast<int64_t>(t->t.element_size());
        const int64_t e0 = off / es, e1 = (off + n + es - 1) / es;
        at::Tensor piece = at::empty({e1 - e0}, t->t.options().memory_format(at::MemoryFormat::Contiguous));
        atb_gather_flat(t->t, e0, e1, piece);
        bytes = piece.view(at::kByte).narrow(0, off - e0 * es, n);
    }
    s->done[slot].reset();
    s->src[slot] = bytes;
    s->buf[slot].narrow(0, 0, n).copy_(bytes, /*non_blocking=*/true);
    if (!bytes.is_cpu()) {
        const c10::Device device = bytes.device();
        c10::impl::VirtualGuardImpl guard(device.type());
        s->done[slot].emplace(device.type());
        s->done[slot]->record(guard.getStream(device));
    }
    return 0;
    ATB_CATCH(err)
}

int atb_stager_wait(AtbStager *s, int slot, const void **data, AtbError *err) {
    ATB_TRY
    if (slot < 0 || slot > 1) {
        std::snprintf(err->msg, sizeof(err->msg), "stager: bad slot %d", slot);
        return -1;
    }
    if (s->done[slot]) {
        s->done[slot]->synchronize();
        s->done[slot].reset();
    }
    s->src[slot] = at::Tensor();
    *data = s->buf[slot].const_data_ptr();
    return 0;
    ATB_CATCH(err)
}

void atb_stager_free(AtbStager *s) {
    ATB_TRY
    if (s == nullptr) return;
    // A copy may still be in flight into a buffer that is about to be freed (an
    // error path): wait for it; nothing can be reported from here.
    for (auto &d : s->done) {
        try {
            if (d) d->synchronize();
        } catch (...) {
        }
    }
    delete s;
    ATB_CATCH_VOID
}

int atb_cuda_available(void) {
    ATB_TRY
    return at::hasCUDA() ? 1 : 0;
    ATB_CATCH_RETURN(nullptr, 0)
}

void atb_free(AtbTensor *t) {
    ATB_TRY
    delete t;
    ATB_CATCH_VOID
}

void atb_dlpack_free(void *dl_managed) {
    ATB_TRY
    auto *dlm = static_cast<DLManagedTensor *>(dl_managed);
    if (dlm != nullptr && dlm->deleter != nullptr) dlm->deleter(dlm);
    ATB_CATCH_VOID
}

int atb_clone(const AtbTensor *t, AtbTensor **out, AtbError *err) {
    ATB_TRY
    *out = new AtbTensor{t->t.to(at::kCPU).contiguous().clone()};
    return 0;
    ATB_CATCH(err)
}

}  // extern "C"
