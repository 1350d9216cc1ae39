/* The safetensors writer (st_write): checks every tensor before touching bytes,
 * lays the data out, writes the header with checksum placeholders, streams the
 * tensor bytes (device tensors through a two-slot stager) hashing them as they
 * go, then rewrites the header with the digests and commits the file atomically. */
#include "safetensors.h"
#include "safetensors_buf.h"
#include "safetensors_dtype.h"
#include "safetensors_error.h"
#include "aten_bridge.h"
#include "atomic_file.h"
#include "stream_sink.h"
#include "xxh64.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SFT_CHUNK ((size_t)8 << 20) /* bytes hashed + written per GIL release */
#define SFT_PROGRESS_EVERY ((uint64_t)64 << 20)

typedef struct {
    PyObject *name;    /* strong */
    AtbTensor *tensor; /* owned */
    int dtype;         /* index into sft_dtypes */
    int is_cpu;        /* atb_is_cpu, asked once */
    int is_contig;     /* atb_is_contiguous, asked once */
    uint64_t nbytes, begin;
    size_t hash_pos;   /* where its 16 hex digits sit in the header */
} SftOut;

/* One st_write call. */
typedef struct {
    ModuleState *st;
    PyObject *display;  /* borrowed: the path, for messages */
    SftOut *outs;       /* in the caller's order (the header's) */
    SftOut **order;     /* in data order */
    Py_ssize_t nout;
    uint64_t total;     /* bytes of the data section */
    SftBuf hdr;         /* length prefix + JSON + padding */
    PyObject *progress; /* borrowed; None or a callable */
    size_t stage_bytes; /* > 0: every tensor through the stager, in chunks this big */
    int stage_pinned;   /* tests: ask for page-locked staging buffers even with stage_bytes */
} SftWriter;

/* ------------------------------------------------------------------ 1. the tensors */

/* Refuse, before any export, the tensors whose bytes DLPack cannot describe or
 * would describe wrongly: subclasses (DTensor, FSDP2 shards, wrappers: their
 * storage is not their value). */
static int
sft_check_type(SftWriter *w, PyObject *value, PyObject *key)
{
    SftState *ss = &w->st->sft;
    if ((PyObject *)Py_TYPE(value) == ss->Tensor || (PyObject *)Py_TYPE(value) == ss->Parameter) {
        return 0;
    }
    int sharded = PyObject_HasAttrString(value, "full_tensor") && PyObject_HasAttrString(value, "device_mesh");
    if (sharded) {
        PyErr_Format(PyExc_TypeError,
                     "%U: tensor %R is a %.100s (a sharded tensor): gather it, e.g. `full_tensor()`, or save "
                     "with the torch format / DCP; sharded saves are not supported yet",
                     w->display, key, Py_TYPE(value)->tp_name);
    }
    else {
        PyErr_Format(PyExc_TypeError,
                     "%U: tensor %R is a %.100s, a torch.Tensor subclass whose storage need not hold its "
                     "values: save a plain tensor (e.g. its underlying data as torch.Tensor), or use the "
                     "torch format",
                     w->display, key, Py_TYPE(value)->tp_name);
    }
    return -1;
}

/* Nested, quantized and meta tensors, then any non-strided layout (sparse COO,
 * CSR/CSC/BSR/BSC, jagged, mkldnn). */
static int
sft_check_kind(SftWriter *w, PyObject *value, PyObject *key)
{
    static const struct {
        const char *attr, *what;
    } kinds[] = {
        {"is_nested", "is a nested tensor: save its components (`unbind()`) or a padded copy "
                      "(`to_padded_tensor`)"},
        {"is_quantized", "is quantized: save `int_repr()` with its scale and zero point, or `dequantize()`"},
        {"is_meta", "is on the meta device and has no data: materialise it (e.g. `to_empty()` and load or "
                    "initialise it) first"},
    };
    PyObject *attr = NULL, *sp = NULL;
    int rc = -1;
    for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++) {
        attr = PyObject_GetAttrString(value, kinds[i].attr);
        int yes = attr ? PyObject_IsTrue(attr) : -1;
        Py_CLEAR(attr);
        if (yes < 0) {
            goto done;
        }
        if (yes) {
            sft_fail(w->st, w->display, "tensor %R %s", key, kinds[i].what);
            goto done;
        }
    }
    if ((attr = PyObject_GetAttrString(value, "layout")) == NULL) {
        goto done;
    }
    if (attr == w->st->sft.strided) {
        rc = 0;
        goto done;
    }
    sp = PyObject_GetAttrString(value, "is_sparse");
    int sparse = sp ? PyObject_IsTrue(sp) : -1;
    if (sparse > 0) {
        sft_fail(w->st, w->display,
                 "tensor %R is sparse: save `to_dense()`, or its indices and values as separate tensors", key);
    }
    else if (sparse == 0) {
        sft_fail(w->st, w->display,
                 "tensor %R has layout %S: only strided (dense) tensors can be stored; save `to_dense()`", key, attr);
    }
done:
    Py_XDECREF(attr);
    Py_XDECREF(sp);
    return rc;
}

/* An AtbTensor over a torch tensor's storage (via DLPack; no copy).  Exported by
 * torch._C._to_dlpack (`to_dlpack`): Tensor.__dlpack__ refuses a CUDA tensor that is
 * not on the current device, and a model may span several (each is staged from its own). */
static int
sft_tensor_handle(PyObject *tensor, PyObject *to_dlpack, AtbTensor **out)
{
    PyObject *detached = NULL, *cap = NULL;
    AtbError err;
    int rc = -1;
    if ((detached = PyObject_CallMethod(tensor, "detach", NULL)) == NULL) {
        goto done;
    }
    /* DLPack has no conjugate or negative bit: a lazily conjugated or negated view
     * (x.conj(), x.conj().imag) would export its unmodified bytes and come back with
     * the wrong sign. Materialise them (asking first: the bits are rare, and the
     * question is cheaper than the no-op resolve). */
    static const char *const bits[2][2] = {{"is_conj", "resolve_conj"}, {"is_neg", "resolve_neg"}};
    for (int b = 0; b < 2; b++) {
        PyObject *set = PyObject_CallMethod(detached, bits[b][0], NULL);
        int yes = set ? PyObject_IsTrue(set) : -1;
        Py_XDECREF(set);
        if (yes < 0) {
            goto done;
        }
        if (yes) {
            Py_SETREF(detached, PyObject_CallMethod(detached, bits[b][1], NULL));
            if (detached == NULL) {
                goto done;
            }
        }
    }
    if ((cap = PyObject_CallOneArg(to_dlpack, detached)) == NULL) {
        goto done;
    }
    void *dlm = PyCapsule_GetPointer(cap, "dltensor");
    if (dlm == NULL || PyCapsule_SetName(cap, "used_dltensor") < 0) {
        goto done;
    }
    if (atb_from_dlpack(dlm, out, &err) < 0) { /* the bridge ran dlm's deleter */
        PyErr_SetString(PyExc_ValueError, err.msg);
        goto done;
    }
    rc = 0;
done:
    Py_XDECREF(detached);
    Py_XDECREF(cap);
    return rc;
}

/* dtype, size and shape of o's exported tensor (`value` names a refused dtype). */
static int
sft_describe(SftWriter *w, SftOut *o, PyObject *value, PyObject *key)
{
    o->dtype = sft_dtype_by_code(atb_dtype(o->tensor));
    if (o->dtype < 0) {
        PyObject *dt = PyObject_GetAttrString(value, "dtype");
        if (dt != NULL) {
            sft_fail(w->st, w->display, "tensor %R has dtype %S, which the format cannot store", key, dt);
            Py_DECREF(dt);
        }
        return -1;
    }
    /* -1 is the bridge's failure sentinel for each of these */
    int64_t nb = atb_nbytes(o->tensor);
    int ndim = atb_ndim(o->tensor);
    o->is_cpu = atb_is_cpu(o->tensor);
    o->is_contig = atb_is_contiguous(o->tensor);
    int bad = nb < 0 || ndim < 0 || ndim > SFT_MAX_NDIM || o->is_cpu < 0 || o->is_contig < 0;
    for (int d = 0; !bad && d < ndim; d++) {
        bad = atb_size(o->tensor, d) < 0;
    }
    if (bad) {
        return sft_fail(w->st, w->display, "tensor %R has an unsupported shape", key);
    }
    o->nbytes = (uint64_t)nb;
    return 0;
}

/* Check tensor `key` -> `value` and export it into w->outs[w->nout]. */
static int
sft_add_tensor(SftWriter *w, PyObject *key, PyObject *value)
{
    SftOut *o = &w->outs[w->nout];
    if (!PyUnicode_Check(key)) {
        PyErr_Format(PyExc_TypeError, "%U: tensor names must be str, not %.100s", w->display, Py_TYPE(key)->tp_name);
        return -1;
    }
    if (PyUnicode_GetLength(key) == 0 || PyUnicode_CompareWithASCIIString(key, "__metadata__") == 0) {
        return sft_fail(w->st, w->display, "%R is not a valid tensor name", key);
    }
    if (!PyObject_TypeCheck(value, (PyTypeObject *)w->st->sft.Tensor)) {
        PyErr_Format(PyExc_TypeError, "%U: tensor %R is a %.100s, not a torch.Tensor", w->display, key,
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    if (sft_check_type(w, value, key) < 0 || sft_check_kind(w, value, key) < 0) {
        return -1;
    }
    o->name = Py_NewRef(key);
    w->order[w->nout++] = o; /* o is released with the others from here on */
    if (sft_tensor_handle(value, w->st->sft.to_dlpack, &o->tensor) < 0) {
        return sft_rewrap(w->st, w->display, "cannot read tensor %R", key);
    }
    return sft_describe(w, o, value, key);
}

static int
sft_cmp_out_align(const void *a, const void *b)
{
    const SftOut *x = *(const SftOut *const *)a, *y = *(const SftOut *const *)b;
    int sx = sft_dtypes[x->dtype].itemsize, sy = sft_dtypes[y->dtype].itemsize;
    if (sx != sy) {
        return sx > sy ? -1 : 1;
    }
    return x < y ? -1 : (x > y); /* stable: keep the caller's order */
}

/* Every tensor of `tensors` checked and exported, then the data order: larger
 * items first, so every tensor starts on a multiple of its item size (the data
 * section itself starts SFT_ALIGN-aligned). */
static int
sft_collect(SftWriter *w, PyObject *tensors)
{
    /* A snapshot: detach()/__dlpack__ run Python code that could change the dict. */
    PyObject *items = PyDict_Items(tensors);
    int rc = -1;
    if (items == NULL) {
        goto done;
    }
    Py_ssize_t count = PyList_GET_SIZE(items);
    w->outs = PyMem_Calloc((size_t)count + 1, sizeof(SftOut));
    w->order = PyMem_Calloc((size_t)count + 1, sizeof(SftOut *));
    if (w->outs == NULL || w->order == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        if (sft_add_tensor(w, PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1)) < 0) {
            goto done;
        }
    }
    qsort(w->order, (size_t)w->nout, sizeof(SftOut *), sft_cmp_out_align);
    for (Py_ssize_t i = 0; i < w->nout; i++) {
        w->order[i]->begin = w->total;
        w->total += w->order[i]->nbytes;
    }
    rc = 0;
done:
    Py_XDECREF(items);
    return rc;
}

/* ------------------------------------------------------------------ 2. the header */

/* "__metadata__": the caller's str pairs, then the checksums with zero placeholders. */
static int
sft_header_metadata(SftWriter *w, PyObject *metadata)
{
    SftBuf *hdr = &w->hdr;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    if (sft_buf_str(hdr, "{\"__metadata__\":{") < 0) {
        return -1;
    }
    while (PyDict_Next(metadata, &pos, &key, &value)) {
        if (!PyUnicode_Check(key) || !PyUnicode_Check(value)) {
            PyErr_Format(PyExc_TypeError, "%U: metadata keys and values must be str (key %R)", w->display, key);
            return -1;
        }
        if (PyUnicode_CompareWithASCIIString(key, "checksums") == 0 ||
            PyUnicode_CompareWithASCIIString(key, "checksum_algorithm") == 0) {
            return sft_fail(w->st, w->display, "metadata key %R is reserved for the writer", key);
        }
        if (sft_buf_json_str(hdr, key) < 0 || sft_buf_str(hdr, ":") < 0 || sft_buf_json_str(hdr, value) < 0 ||
            sft_buf_str(hdr, ",") < 0) {
            return -1;
        }
    }
    return sft_buf_str(hdr, "\"checksum_algorithm\":\"xxh64\",\"checksums\":\"{");
}

/* The checksums map, a JSON object inside a JSON string: every name escaped twice. */
static int
sft_header_checksums(SftWriter *w)
{
    SftBuf *hdr = &w->hdr, once = {0};
    int rc = -1;
    for (Py_ssize_t i = 0; i < w->nout; i++) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(w->outs[i].name, &n);
        once.len = 0;
        if (s == NULL || sft_buf_json_body(&once, s, (size_t)n) < 0 ||
            sft_buf_str(hdr, i ? ",\\\"" : "\\\"") < 0 || sft_buf_json_body(hdr, once.data, once.len) < 0 ||
            sft_buf_str(hdr, "\\\":\\\"") < 0) {
            goto done;
        }
        w->outs[i].hash_pos = hdr->len;
        if (sft_buf_str(hdr, "0000000000000000\\\"") < 0) {
            goto done;
        }
    }
    rc = sft_buf_str(hdr, "}\"}");
done:
    PyMem_Free(once.data);
    return rc;
}

/* ,"name":{"dtype":"F32","shape":[2,3],"data_offsets":[b,e]} */
static int
sft_header_entry(SftBuf *hdr, const SftOut *o)
{
    char num[64];
    if (sft_buf_str(hdr, ",") < 0 || sft_buf_json_str(hdr, o->name) < 0 || sft_buf_str(hdr, ":{\"dtype\":\"") < 0 ||
        sft_buf_str(hdr, sft_dtypes[o->dtype].name) < 0 || sft_buf_str(hdr, "\",\"shape\":[") < 0) {
        return -1;
    }
    int ndim = atb_ndim(o->tensor);
    for (int d = 0; d < ndim; d++) {
        snprintf(num, sizeof(num), d ? ",%lld" : "%lld", (long long)atb_size(o->tensor, d));
        if (sft_buf_str(hdr, num) < 0) {
            return -1;
        }
    }
    snprintf(num, sizeof(num), "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)o->begin,
             (unsigned long long)(o->begin + o->nbytes));
    return sft_buf_str(hdr, num);
}

/* Pad the JSON with spaces so the data starts SFT_ALIGN-aligned, then put the
 * 8-byte little-endian length in front. */
static int
sft_header_frame(SftWriter *w)
{
    SftBuf *hdr = &w->hdr;
    size_t json_len = hdr->len;
    size_t padded = json_len + (SFT_ALIGN - (8 + json_len) % SFT_ALIGN) % SFT_ALIGN;
    if (padded > SFT_MAX_HEADER) {
        return sft_fail(w->st, w->display, "the header would be %zu bytes, over the %llu-byte limit", padded,
                        (unsigned long long)SFT_MAX_HEADER);
    }
    if (sft_buf_reserve(hdr, padded - json_len + 8) < 0) {
        return -1;
    }
    memset(hdr->data + json_len, ' ', padded - json_len);
    memmove(hdr->data + 8, hdr->data, padded);
    for (int i = 0; i < 8; i++) {
        hdr->data[i] = (char)(((uint64_t)padded >> (8 * i)) & 0xff);
    }
    hdr->len = padded + 8;
    for (Py_ssize_t i = 0; i < w->nout; i++) {
        w->outs[i].hash_pos += 8;
    }
    return 0;
}

static int
sft_build_header(SftWriter *w, PyObject *metadata)
{
    if (sft_header_metadata(w, metadata) < 0 || sft_header_checksums(w) < 0) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < w->nout; i++) {
        if (sft_header_entry(&w->hdr, &w->outs[i]) < 0) {
            return -1;
        }
    }
    if (sft_buf_str(&w->hdr, "}") < 0) {
        return -1;
    }
    return sft_header_frame(w);
}

/* ------------------------------------------------------------------ 3. the data */

static int
sft_call_progress(PyObject *progress, uint64_t done, uint64_t total)
{
    if (progress == NULL || progress == Py_None) {
        return 0;
    }
    PyObject *r = PyObject_CallFunction(progress, "KK", (unsigned long long)done, (unsigned long long)total);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

/* Append `n` bytes to the file with the GIL released, hashing them first into `h`
 * when given; an OSError naming the file on failure. */
static int
sft_write_nogil(StreamSink *sink, const void *data, size_t n, Xxh64State *h, PyObject *display)
{
    int rc, saved_errno;
    Py_BEGIN_ALLOW_THREADS
    if (h != NULL) {
        xxh64_update(h, data, n);
    }
    rc = stream_sink_write(sink, data, n, NULL);
    saved_errno = errno;
    Py_END_ALLOW_THREADS
    return rc < 0 ? sft_os_error(display, saved_errno) : 0;
}

/* One piece of the data section: bytes [off, off + n) of order[i]'s tensor, read
 * in place (slot -1) or through a stager slot. */
typedef struct {
    Py_ssize_t i;
    uint64_t off;
    size_t n;
    int slot;
} SftPiece;

/* The data pass: the state st_write_data carries from one piece to the next. */
typedef struct {
    SftWriter *w;
    StreamSink *sink;
    size_t chunk;
    AtbStager *stager;  /* NULL when no tensor is staged */
    int next_slot;
    AtbTensor *host;    /* contiguous host image of order[host_of] */
    Py_ssize_t host_of;
    Xxh64State hash;    /* of the tensor being written */
    uint64_t done, next_report;
} SftDataPass;

/* The piece after `p` (the first when p is NULL), skipping empty tensors; 0 at the end. */
static int
sft_piece_after(const SftDataPass *dp, const SftPiece *p, SftPiece *out)
{
    SftOut *const *order = dp->w->order;
    Py_ssize_t i = p ? p->i : 0;
    uint64_t off = p ? p->off + p->n : 0;
    for (; i < dp->w->nout; i++, off = 0) {
        if (off < order[i]->nbytes) {
            uint64_t left = order[i]->nbytes - off;
            *out = (SftPiece){.i = i, .off = off, .n = (size_t)(left < dp->chunk ? left : dp->chunk), .slot = -1};
            return 1;
        }
    }
    return 0;
}

/* Whether a tensor's bytes go through the stager: device tensors and
 * non-contiguous ones (gathered a chunk at a time, never copied whole), every
 * tensor when the tests ask for it (`stage_bytes` > 0). */
static int
sft_is_staged(const SftOut *o, size_t stage_bytes)
{
    return stage_bytes || !o->is_cpu || !o->is_contig;
}

/* Queue piece `p` into the stager's next slot, if its tensor is staged (else it is
 * read in place and nothing happens). */
static int
sft_stage(SftDataPass *dp, SftPiece *p)
{
    const SftOut *o = dp->w->order[p->i];
    AtbError err;
    int rc;
    if (!sft_is_staged(o, dp->w->stage_bytes)) {
        return 0;
    }
    p->slot = dp->next_slot;
    dp->next_slot ^= 1;
    Py_BEGIN_ALLOW_THREADS
    rc = atb_stager_start(dp->stager, p->slot, o->tensor, (int64_t)p->off, (int64_t)p->n, &err);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        sft_fail(dp->w->st, dp->w->display, "cannot read the bytes of tensor %R: %s", o->name, err.msg);
    }
    return rc;
}

/* The first time in this process that page-locked staging buffers could not be
 * had: say so (a UserWarning), with why and what it costs. */
static int
sft_note_unpinned(SftWriter *w, const char *why)
{
    char reason[sizeof(((AtbError *)NULL)->msg)] = {0};
    size_t len = 0;
    if (w->st->sft.noted_unpinned) {
        return 0;
    }
    w->st->sft.noted_unpinned = 1;
    snprintf(reason, sizeof(reason), "%s", why);
    len = strlen(reason);
    while (len > 0 && (reason[len - 1] == '.' || reason[len - 1] == ' ' || reason[len - 1] == '\n')) {
        reason[--len] = '\0'; /* ATen's sentence ends inside our parentheses */
    }
    return PyErr_WarnFormat(PyExc_UserWarning, 1,
                            "modelopt_c: no page-locked (pinned) host memory for the staging buffers (%s): "
                            "tensors on the device are saved through plain host buffers, with synchronous copies "
                            "that no longer overlap the writes (slower; the file is the same). Said once per process.",
                            reason);
}

/* Empty tensors get the digest of no bytes now (no piece will finish them); the
 * stager is made when some tensor needs it, its buffers page-locked when a device
 * tensor is staged (the copies then overlap the writes). */
static int
sft_data_start(SftDataPass *dp)
{
    SftWriter *w = dp->w;
    AtbError err = {{0}}, pin_err = {{0}};
    int any_staged = 0, any_device = 0, pinned = 0, r = -1, unpinned = 0;
    for (Py_ssize_t i = 0; i < w->nout; i++) {
        if (w->order[i]->nbytes == 0) {
            xxh64_to_hex(xxh64_buffer("", 0), w->hdr.data + w->order[i]->hash_pos);
        }
        else if (sft_is_staged(w->order[i], w->stage_bytes)) {
            any_staged = 1;
            any_device |= !w->order[i]->is_cpu;
        }
    }
    if (!any_staged) {
        return 0;
    }
    pinned = (any_device && !w->stage_bytes) || w->stage_pinned;
    Py_BEGIN_ALLOW_THREADS
    r = atb_stager_new(dp->chunk, pinned, &dp->stager, &pin_err);
    if (r < 0 && pinned) { /* no page-locked memory: plain buffers, synchronous copies */
        unpinned = 1;
        r = atb_stager_new(dp->chunk, 0, &dp->stager, &err);
    }
    else if (r < 0) {
        err = pin_err;
    }
    Py_END_ALLOW_THREADS
    if (r < 0) {
        return sft_fail(w->st, w->display, "cannot allocate the staging buffers: %s", err.msg);
    }
    return unpinned ? sft_note_unpinned(w, pin_err.msg) : 0;
}

/* Where the bytes of piece `p` are: its stager slot once the copy is done, or the
 * tensor's contiguous host image (made once per tensor). */
static int
sft_piece_bytes(SftDataPass *dp, const SftPiece *p, const char **data)
{
    SftOut *o = dp->w->order[p->i];
    AtbError err;
    int r;
    if (p->slot >= 0) {
        const void *q = NULL;
        Py_BEGIN_ALLOW_THREADS
        r = atb_stager_wait(dp->stager, p->slot, &q, &err);
        Py_END_ALLOW_THREADS
        *data = q;
        return r < 0 ? sft_fail(dp->w->st, dp->w->display, "cannot read the bytes of tensor %R: %s", o->name, err.msg)
                     : 0;
    }
    if (dp->host_of != p->i) {
        if (dp->host != NULL) {
            atb_free(dp->host);
            dp->host = NULL;
        }
        Py_BEGIN_ALLOW_THREADS
        r = atb_host_contiguous(o->tensor, &dp->host, &err);
        Py_END_ALLOW_THREADS
        if (r < 0) {
            return sft_fail(dp->w->st, dp->w->display, "cannot read the bytes of tensor %R: %s", o->name, err.msg);
        }
        dp->host_of = p->i;
        if (atb_nbytes(dp->host) < 0 || (uint64_t)atb_nbytes(dp->host) != o->nbytes) {
            return sft_fail(dp->w->st, dp->w->display, "tensor %R changed size while being written", o->name);
        }
    }
    *data = (const char *)atb_data(dp->host);
    if (*data == NULL) { /* the bridge's failure sentinel (this piece has bytes) */
        return sft_fail(dp->w->st, dp->w->display, "cannot read the bytes of tensor %R", o->name);
    }
    *data += p->off;
    return 0;
}

/* Write piece `p` hashing it; the digest goes into the header when it ends its
 * tensor.  Then signals and progress. */
static int
sft_write_piece(SftDataPass *dp, const SftPiece *p, const char *data)
{
    SftWriter *w = dp->w;
    SftOut *o = w->order[p->i];
    if (p->off == 0) {
        xxh64_init(&dp->hash);
    }
    if (sft_write_nogil(dp->sink, data, p->n, &dp->hash, w->display) < 0) {
        return -1;
    }
    if (p->off + p->n == o->nbytes) {
        xxh64_to_hex(xxh64_digest(&dp->hash), w->hdr.data + o->hash_pos);
    }
    dp->done += p->n;
    if (PyErr_CheckSignals() < 0) {
        return -1;
    }
    if (dp->done >= dp->next_report && dp->done < w->total) {
        dp->next_report = dp->done + SFT_PROGRESS_EVERY;
        return sft_call_progress(w->progress, dp->done, w->total);
    }
    return 0;
}

/* The data section, tensor after tensor in data order, hashed as it goes (the
 * digests land in the header at their hash_pos).  Contiguous CPU tensors are
 * written from where they lie.  Other tensors (on a device, or non-contiguous:
 * each chunk gathered on its own, never a whole contiguous copy) go through a
 * stager's two host buffers, pinned for device tensors when possible: the copy of
 * the next piece is queued before the current one is written, so device-to-host
 * copies overlap the writes and at most two chunks of host memory are used
 * whatever the tensor sizes.  `stage_bytes` > 0 (tests) sends every
 * tensor through the stager, in chunks of that size, to exercise the same
 * pipeline without a device. */
static int
sft_write_data(SftWriter *w, StreamSink *sink)
{
    SftDataPass dp = {.w = w, .sink = sink, .chunk = w->stage_bytes ? w->stage_bytes : SFT_CHUNK, .host_of = -1,
                      .next_report = SFT_PROGRESS_EVERY};
    SftPiece cur, nxt;
    int rc = -1, have_cur, have_nxt;
    if (sft_data_start(&dp) < 0) {
        goto done;
    }
    have_cur = sft_piece_after(&dp, NULL, &cur);
    if (have_cur && sft_stage(&dp, &cur) < 0) {
        goto done;
    }
    while (have_cur) {
        const char *data = NULL;
        have_nxt = sft_piece_after(&dp, &cur, &nxt);
        if ((have_nxt && sft_stage(&dp, &nxt) < 0) || sft_piece_bytes(&dp, &cur, &data) < 0 ||
            sft_write_piece(&dp, &cur, data) < 0) {
            goto done;
        }
        cur = nxt;
        have_cur = have_nxt;
    }
    rc = sft_call_progress(w->progress, dp.done, w->total);
done:
    if (dp.host != NULL) {
        atb_free(dp.host);
    }
    atb_stager_free(dp.stager); /* waits for a copy still in flight */
    return rc;
}

/* ------------------------------------------------------------------ 4. the file */

/* The temporary file next to the target, its writeback started, and the sink that
 * writes it (stream_sink.c: O_DIRECT where the file system takes it, the copies and
 * hashing here overlapping the writes there). */
static int
sft_open_temp(SftWriter *w, AtomicFile *af, StreamSink *sink, PyObject *fsbytes)
{
    int rc, saved_errno;
    if (strlen(PyBytes_AS_STRING(fsbytes)) != (size_t)PyBytes_GET_SIZE(fsbytes)) {
        return sft_fail(w->st, w->display, "not a file name");
    }
    Py_BEGIN_ALLOW_THREADS
    rc = atomic_file_open(af, PyBytes_AS_STRING(fsbytes));
    if (rc == 0) {
        atomic_file_start_writeback(af); /* what goes through the page cache is written out early */
        rc = stream_sink_open(sink, af->tmp, SFT_CHUNK, stream_sink_direct_wanted());
    }
    saved_errno = errno;
    Py_END_ALLOW_THREADS
    return rc < 0 ? sft_os_error(w->display, saved_errno) : 0;
}

/* The rest of the data written out, the final header over the placeholders, then
 * fsync, rename, fsync the folder. */
static int
sft_commit(SftWriter *w, AtomicFile *af, StreamSink *sink)
{
    int rc, saved_errno = 0;
    off_t zero = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = stream_sink_finish(sink);
    if (rc == 0) {
        rc = sft_write_all(af->fd, w->hdr.data, w->hdr.len, &zero);
    }
    if (rc == 0) {
        rc = atomic_file_commit(af);
    }
    saved_errno = errno;
    Py_END_ALLOW_THREADS
    return rc < 0 ? sft_os_error(w->display, saved_errno) : 0;
}

static void
sft_writer_clear(SftWriter *w)
{
    for (Py_ssize_t i = 0; i < w->nout; i++) {
        Py_XDECREF(w->outs[i].name);
        if (w->outs[i].tensor) {
            atb_free(w->outs[i].tensor);
        }
    }
    PyMem_Free(w->outs);
    PyMem_Free(w->order);
    PyMem_Free(w->hdr.data);
}

PyObject *
sft_write(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"path", "tensors", "metadata", "progress", "_stage_bytes", "_stage_pinned", NULL};
    PyObject *path = NULL, *tensors = NULL, *metadata = NULL, *progress = Py_None;
    PyObject *fsbytes = NULL, *display = NULL, *result = NULL;
    Py_ssize_t stage_bytes = 0;
    int stage_pinned = 0;
    SftWriter w = {.st = module_state(module)};
    AtomicFile af = {.fd = -1};
    StreamSink sink = {0};

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!O!|$Onp:st_write", kwlist, &path, &PyDict_Type, &tensors,
                                     &PyDict_Type, &metadata, &progress, &stage_bytes, &stage_pinned)) {
        goto done;
    }
    if (stage_bytes < 0 || (size_t)stage_bytes > ((size_t)1 << 30)) {
        PyErr_SetString(PyExc_ValueError, "st_write: _stage_bytes must be between 0 and 2**30");
        goto done;
    }
    if (sft_path_args(path, &fsbytes, &display) < 0) {
        goto done;
    }
    if (progress != Py_None && !PyCallable_Check(progress)) {
        PyErr_SetString(PyExc_TypeError, "st_write: progress must be callable or None");
        goto done;
    }
    w.display = display;
    w.progress = progress;
    w.stage_bytes = (size_t)stage_bytes;
    w.stage_pinned = stage_pinned;
    /* 1. every tensor looked at (no bytes touched yet), 2. the header with zero
     * placeholders for the checksums, 3. the temporary file, 4. header, tensor
     * bytes hashed as they go, final header, commit. */
    if (sft_collect(&w, tensors) < 0 || sft_build_header(&w, metadata) < 0 ||
        sft_open_temp(&w, &af, &sink, fsbytes) < 0 || sft_write_nogil(&sink, w.hdr.data, w.hdr.len, NULL, display) < 0 ||
        sft_write_data(&w, &sink) < 0 || sft_commit(&w, &af, &sink) < 0) {
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_BEGIN_ALLOW_THREADS
    stream_sink_close(&sink); /* its thread stopped, its descriptors closed */
    Py_END_ALLOW_THREADS
    atomic_file_close(&af); /* closes the temp file and removes it unless it was committed */
    sft_writer_clear(&w);
    Py_XDECREF(fsbytes);
    Py_XDECREF(display);
    return result;
}
