/* st_format.c: the safetensors-compatible checkpoint format (docs/FORMAT.md).
 * A crash-safe writer that streams tensor bytes and checksums them (XXH64) as it
 * goes, and a reader that validates an untrusted header and maps the data section
 * zero-copy into tensors through the ATen bridge. */
#include "st_format.h"
#include "aten_bridge.h"
#include "atomic_file.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define ST_MAX_HEADER 100000000ULL /* the safetensors package's own cap */
#define ST_ALIGN 64                /* the data section starts on this boundary */
#define ST_MAX_NDIM 64
#define ST_CHUNK ((size_t)8 << 20) /* bytes hashed + written per GIL release */
#define ST_PROGRESS_EVERY ((uint64_t)64 << 20)

/* ------------------------------------------------------------------ dtypes */

typedef struct {
    const char *name;
    AtbDtype code;
    int itemsize;
} StDtype;

static const StDtype st_dtypes[] = {
    {"BOOL", ATB_BOOL, 1}, {"U8", ATB_U8, 1},     {"I8", ATB_I8, 1},
    {"I16", ATB_I16, 2},   {"I32", ATB_I32, 4},   {"I64", ATB_I64, 8},
    {"U16", ATB_U16, 2},   {"U32", ATB_U32, 4},   {"U64", ATB_U64, 8},
    {"F16", ATB_F16, 2},   {"BF16", ATB_BF16, 2}, {"F32", ATB_F32, 4},
    {"F64", ATB_F64, 8},   {"F8_E4M3", ATB_F8_E4M3, 1}, {"F8_E5M2", ATB_F8_E5M2, 1},
};
#define ST_NDTYPES ((int)(sizeof(st_dtypes) / sizeof(st_dtypes[0])))

static int
st_dtype_by_code(AtbDtype code)
{
    for (int i = 0; i < ST_NDTYPES; i++) {
        if (st_dtypes[i].code == code) {
            return i;
        }
    }
    return -1;
}

static int
st_dtype_by_name(const char *s, Py_ssize_t n)
{
    for (int i = 0; i < ST_NDTYPES; i++) {
        if ((Py_ssize_t)strlen(st_dtypes[i].name) == n && memcmp(st_dtypes[i].name, s, (size_t)n) == 0) {
            return i;
        }
    }
    return -1;
}

/* ------------------------------------------------------------------ XXH64 */
/* xxHash64 (seed 0), as specified by github.com/Cyan4973/xxHash doc/xxhash_spec.md. */

#define XXH_P1 11400714785074694791ULL
#define XXH_P2 14029467366897019727ULL
#define XXH_P3 1609587929392839161ULL
#define XXH_P4 9650029242287828579ULL
#define XXH_P5 2870177450012600261ULL

typedef struct {
    uint64_t v[4];
    uint64_t total;
    unsigned char buf[32];
    size_t buffered;
} StHash;

static inline uint64_t
xxh_rotl(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t
xxh_read64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint64_t
xxh_read32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t
xxh_round(uint64_t acc, uint64_t input)
{
    acc += input * XXH_P2;
    acc = xxh_rotl(acc, 31);
    return acc * XXH_P1;
}

static inline uint64_t
xxh_merge(uint64_t acc, uint64_t val)
{
    acc ^= xxh_round(0, val);
    return acc * XXH_P1 + XXH_P4;
}

static void
st_hash_init(StHash *h)
{
    h->v[0] = XXH_P1 + XXH_P2;
    h->v[1] = XXH_P2;
    h->v[2] = 0;
    h->v[3] = (uint64_t)0 - XXH_P1;
    h->total = 0;
    h->buffered = 0;
}

static void
st_hash_stripes(StHash *h, const unsigned char *p, size_t nstripes)
{
    uint64_t v0 = h->v[0], v1 = h->v[1], v2 = h->v[2], v3 = h->v[3];
    for (size_t i = 0; i < nstripes; i++, p += 32) {
        v0 = xxh_round(v0, xxh_read64(p));
        v1 = xxh_round(v1, xxh_read64(p + 8));
        v2 = xxh_round(v2, xxh_read64(p + 16));
        v3 = xxh_round(v3, xxh_read64(p + 24));
    }
    h->v[0] = v0, h->v[1] = v1, h->v[2] = v2, h->v[3] = v3;
}

static void
st_hash_update(StHash *h, const void *data, size_t len)
{
    const unsigned char *p = data;
    h->total += len;
    if (h->buffered + len < 32) {
        if (len) {
            memcpy(h->buf + h->buffered, p, len);
        }
        h->buffered += len;
        return;
    }
    if (h->buffered) {
        size_t fill = 32 - h->buffered;
        memcpy(h->buf + h->buffered, p, fill);
        st_hash_stripes(h, h->buf, 1);
        p += fill;
        len -= fill;
        h->buffered = 0;
    }
    st_hash_stripes(h, p, len / 32);
    p += len / 32 * 32;
    len %= 32;
    memcpy(h->buf, p, len);
    h->buffered = len;
}

static uint64_t
st_hash_digest(const StHash *h)
{
    uint64_t acc;
    if (h->total >= 32) {
        acc = xxh_rotl(h->v[0], 1) + xxh_rotl(h->v[1], 7) + xxh_rotl(h->v[2], 12) + xxh_rotl(h->v[3], 18);
        for (int i = 0; i < 4; i++) {
            acc = xxh_merge(acc, h->v[i]);
        }
    }
    else {
        acc = XXH_P5;
    }
    acc += h->total;
    const unsigned char *p = h->buf;
    size_t n = h->buffered;
    for (; n >= 8; n -= 8, p += 8) {
        acc ^= xxh_round(0, xxh_read64(p));
        acc = xxh_rotl(acc, 27) * XXH_P1 + XXH_P4;
    }
    if (n >= 4) {
        acc ^= xxh_read32(p) * XXH_P1;
        acc = xxh_rotl(acc, 23) * XXH_P2 + XXH_P3;
        n -= 4, p += 4;
    }
    for (; n > 0; n--, p++) {
        acc ^= (uint64_t)*p * XXH_P5;
        acc = xxh_rotl(acc, 11) * XXH_P1;
    }
    acc ^= acc >> 33;
    acc *= XXH_P2;
    acc ^= acc >> 29;
    acc *= XXH_P3;
    acc ^= acc >> 32;
    return acc;
}

static uint64_t
st_xxh64_buffer(const void *data, size_t len)
{
    StHash h;
    st_hash_init(&h);
    st_hash_update(&h, data, len);
    return st_hash_digest(&h);
}

static void
st_hex16(uint64_t v, char out[16])
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 15; i >= 0; i--, v >>= 4) {
        out[i] = digits[v & 15];
    }
}

/* ------------------------------------------------------------------ helpers */

/* The exception type for a bad file: modelopt_c.CheckpointError (a ValueError and
 * a RuntimeError), looked up when an error is raised (a new reference; falls back
 * to ValueError when the Python package is not importable, e.g. mid-shutdown). */
static PyObject *
st_error_type(void)
{
    PyObject *et = NULL, *ev = NULL, *tb = NULL;
    PyErr_Fetch(&et, &ev, &tb); /* kept aside: this runs while building an error */
    PyObject *runtime = PyImport_ImportModule("modelopt_c._runtime");
    PyObject *type = runtime ? PyObject_GetAttrString(runtime, "CheckpointError") : NULL;
    Py_XDECREF(runtime);
    if (type == NULL || !PyType_Check(type) ||
        !PyType_IsSubtype((PyTypeObject *)type, (PyTypeObject *)PyExc_ValueError)) {
        Py_XDECREF(type);
        type = Py_NewRef(PyExc_ValueError);
    }
    PyErr_Clear(); /* only a failed import can be pending here; ValueError stands in */
    PyErr_Restore(et, ev, tb);
    return type;
}

/* CheckpointError "<path>: <message>". Always returns NULL. */
static PyObject *
st_fail(PyObject *display, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    if (msg != NULL) {
        PyObject *type = st_error_type();
        PyObject *text = PyUnicode_FromFormat("%U: %U", display, msg);
        if (text != NULL) {
            PyErr_SetObject(type, text);
            Py_DECREF(text);
        }
        Py_DECREF(type);
        Py_DECREF(msg);
    }
    return NULL;
}

/* Add "<path>: " in front of the message of the pending exception (same type). */
static void
st_prefix_error(PyObject *display, PyObject *what)
{
    PyObject *etype = NULL, *exc = NULL, *tb = NULL;
    PyErr_Fetch(&etype, &exc, &tb);
    PyErr_NormalizeException(&etype, &exc, &tb);
    Py_XDECREF(tb);
    PyObject *text = exc ? PyObject_Str(exc) : NULL;
    if (text == NULL) {
        PyErr_Clear();
        st_fail(display, "%U", what);
    }
    else if (PyErr_GivenExceptionMatches(exc, PyExc_OSError) ||
             PyErr_GivenExceptionMatches(exc, PyExc_KeyboardInterrupt)) {
        PyErr_SetObject(etype, exc);
    }
    else {
        /* BufferError is what __dlpack__ raises for tensors it cannot export; a
         * ValueError becomes a CheckpointError (one type for the format's errors). */
        PyObject *ck = st_error_type();
        PyObject *type = PyErr_GivenExceptionMatches(exc, PyExc_BufferError) ||
                                 (PyErr_GivenExceptionMatches(exc, PyExc_ValueError) &&
                                  !PyErr_GivenExceptionMatches(exc, ck))
                             ? ck
                             : (PyObject *)Py_TYPE(exc);
        PyObject *msg = PyUnicode_FromFormat("%U: %U: %U", display, what, text);
        if (msg != NULL) {
            PyObject *new_exc = PyObject_CallOneArg(type, msg);
            if (new_exc == NULL) {
                PyErr_Clear();
                PyErr_SetObject(ck, msg);
            }
            else {
                PyErr_SetObject(type, new_exc);
                Py_DECREF(new_exc);
            }
            Py_DECREF(msg);
        }
        Py_DECREF(ck);
    }
    Py_XDECREF(text);
    Py_XDECREF(exc);
    Py_XDECREF(etype);
}

/* Path argument -> bytes (filesystem encoding) and a str for messages. */
static int
st_path_args(PyObject *path, PyObject **fsbytes, PyObject **display)
{
    if (!PyUnicode_FSConverter(path, fsbytes)) {
        return -1;
    }
    *display = PyUnicode_DecodeFSDefaultAndSize(PyBytes_AS_STRING(*fsbytes), PyBytes_GET_SIZE(*fsbytes));
    if (*display == NULL) {
        Py_CLEAR(*fsbytes);
        return -1;
    }
    return 0;
}

typedef struct {
    char *data;
    size_t len, cap;
} StBuf;

static int
st_buf_reserve(StBuf *b, size_t extra)
{
    if (b->len + extra <= b->cap) {
        return 0;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) {
        cap *= 2;
    }
    char *data = PyMem_Realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int
st_buf_add(StBuf *b, const char *s, size_t n)
{
    if (st_buf_reserve(b, n) < 0) {
        return -1;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

static int
st_buf_str(StBuf *b, const char *s)
{
    return st_buf_add(b, s, strlen(s));
}

/* The body of a JSON string literal for the UTF-8 bytes s[0:n] (no quotes). */
static int
st_buf_json_body(StBuf *b, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\', esc[1] = (char)c;
            if (st_buf_add(b, esc, 2) < 0) {
                return -1;
            }
        }
        else if (c < 0x20) {
            snprintf(esc, sizeof(esc), "\\u%04x", c);
            if (st_buf_add(b, esc, 6) < 0) {
                return -1;
            }
        }
        else if (st_buf_add(b, (const char *)&c, 1) < 0) {
            return -1;
        }
    }
    return 0;
}

static int
st_buf_json_str(StBuf *b, PyObject *str)
{
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(str, &n);
    if (s == NULL || st_buf_add(b, "\"", 1) < 0 || st_buf_json_body(b, s, (size_t)n) < 0) {
        return -1;
    }
    return st_buf_add(b, "\"", 1);
}

static int
st_write_all(int fd, const char *p, size_t n, off_t *pos)
{
    while (n > 0) {
        size_t chunk = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
        ssize_t w = pos ? pwrite(fd, p, chunk, *pos) : write(fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        if (w == 0) {
            errno = EIO;
            return -1;
        }
        p += w;
        n -= (size_t)w;
        if (pos) {
            *pos += w;
        }
    }
    return 0;
}

static int
st_read_all(int fd, char *p, size_t n, off_t pos)
{
    while (n > 0) {
        ssize_t r = pread(fd, p, n, pos);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        if (r == 0) {
            errno = EIO; /* the file shrank under us */
            return -1;
        }
        p += r;
        n -= (size_t)r;
        pos += r;
    }
    return 0;
}

/* ------------------------------------------------------------------ writer */

typedef struct {
    PyObject *name;    /* strong */
    AtbTensor *tensor; /* owned */
    int dtype;         /* index into st_dtypes */
    int is_cpu;        /* atb_is_cpu, asked once */
    uint64_t nbytes, begin;
    size_t hash_pos;   /* where its 16 hex digits sit in the header */
} StOut;

/* Refuse, before any export, the tensors whose bytes DLPack cannot describe or
 * would describe wrongly: subclasses (DTensor, FSDP2 shards, wrappers: their
 * storage is not their value), sparse, nested, quantized and meta tensors.
 * `plain`: the accepted exact types (torch.Tensor, torch.nn.Parameter), then
 * torch.strided. */
static int
st_check_kind(PyObject *value, PyObject *key, PyObject *display, PyObject *const plain[3])
{
    PyObject *attr = NULL;
    int rc = -1;
    if ((PyObject *)Py_TYPE(value) != plain[0] && (PyObject *)Py_TYPE(value) != plain[1]) {
        int sharded = PyObject_HasAttrString(value, "full_tensor") &&
                      PyObject_HasAttrString(value, "device_mesh");
        if (sharded) {
            PyErr_Format(PyExc_TypeError,
                         "%U: tensor %R is a %.100s (a sharded tensor): gather it, e.g. `full_tensor()`, or save "
                         "with the torch format / DCP; sharded saves are not supported yet",
                         display, key, Py_TYPE(value)->tp_name);
        }
        else {
            PyErr_Format(PyExc_TypeError,
                         "%U: tensor %R is a %.100s, a torch.Tensor subclass whose storage need not hold its "
                         "values: save a plain tensor (e.g. its underlying data as torch.Tensor), or use the "
                         "torch format",
                         display, key, Py_TYPE(value)->tp_name);
        }
        goto error;
    }
    static const struct {
        const char *attr, *what;
    } kinds[] = {
        {"is_nested", "is a nested tensor: save its components (`unbind()`) or a padded copy "
                      "(`to_padded_tensor`)"},
        {"is_quantized", "is quantized: save `int_repr()` with its scale and zero point, or `dequantize()`"},
        {"is_meta", "is on the meta device and has no data: materialise it (e.g. `to_empty()` and load or "
                    "initialise it) first"},
    };
    for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++) {
        attr = PyObject_GetAttrString(value, kinds[i].attr);
        int yes = attr ? PyObject_IsTrue(attr) : -1;
        Py_CLEAR(attr);
        if (yes < 0) {
            goto error;
        }
        if (yes) {
            st_fail(display, "tensor %R %s", key, kinds[i].what);
            goto error;
        }
    }
    /* Any non-strided layout: sparse (COO, CSR/CSC/BSR/BSC), jagged, mkldnn. */
    attr = PyObject_GetAttrString(value, "layout");
    if (attr == NULL) {
        goto error;
    }
    if (attr != plain[2]) {
        PyObject *sp = PyObject_GetAttrString(value, "is_sparse");
        int sparse = sp ? PyObject_IsTrue(sp) : -1;
        Py_XDECREF(sp);
        if (sparse > 0) {
            st_fail(display, "tensor %R is sparse: save `to_dense()`, or its indices and values as separate tensors",
                    key);
        }
        else if (sparse == 0) {
            st_fail(display, "tensor %R has layout %S: only strided (dense) tensors can be stored; save `to_dense()`",
                    key, attr);
        }
        goto error;
    }
    rc = 0;
error:
    Py_XDECREF(attr);
    return rc;
}

/* An AtbTensor over a torch tensor's storage (via DLPack; no copy). */
static int
st_tensor_handle(PyObject *tensor, AtbTensor **out, AtbError *err)
{
    PyObject *detached = NULL, *cap = NULL;
    int rc = -1;
    detached = PyObject_CallMethod(tensor, "detach", NULL);
    if (detached == NULL) {
        goto error;
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
            goto error;
        }
        if (yes) {
            Py_SETREF(detached, PyObject_CallMethod(detached, bits[b][1], NULL));
            if (detached == NULL) {
                goto error;
            }
        }
    }
    cap = PyObject_CallMethod(detached, "__dlpack__", NULL);
    if (cap == NULL) {
        goto error;
    }
    void *dlm = PyCapsule_GetPointer(cap, "dltensor");
    if (dlm == NULL || PyCapsule_SetName(cap, "used_dltensor") < 0) {
        goto error;
    }
    if (atb_from_dlpack(dlm, out, err) < 0) { /* the bridge ran dlm's deleter */
        PyErr_SetString(PyExc_ValueError, err->msg);
        goto error;
    }
    rc = 0;
error:
    Py_XDECREF(detached);
    Py_XDECREF(cap);
    return rc;
}

static int
st_cmp_out_align(const void *a, const void *b)
{
    const StOut *x = *(const StOut *const *)a, *y = *(const StOut *const *)b;
    int sx = st_dtypes[x->dtype].itemsize, sy = st_dtypes[y->dtype].itemsize;
    if (sx != sy) {
        return sx > sy ? -1 : 1;
    }
    return x < y ? -1 : (x > y); /* stable: keep the caller's order */
}

static int
st_call_progress(PyObject *progress, uint64_t done, uint64_t total)
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

/* Append `n` bytes to fd with the GIL released, hashing them first into `h` when
 * given; an OSError naming the file on failure. */
static int
st_write_nogil(int fd, const void *data, size_t n, StHash *h, PyObject *display)
{
    int rc, saved_errno;
    Py_BEGIN_ALLOW_THREADS
    if (h != NULL) {
        st_hash_update(h, data, n);
    }
    rc = st_write_all(fd, data, n, NULL);
    saved_errno = errno;
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        errno = saved_errno;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, display);
    }
    return rc;
}

/* One piece of the data section: bytes [off, off + n) of order[i]'s tensor, read
 * in place (slot -1) or through a stager slot. */
typedef struct {
    Py_ssize_t i;
    uint64_t off;
    size_t n;
    int slot;
} StPiece;

/* The piece after `p` (the first when p is NULL), skipping empty tensors; 0 at the end. */
static int
st_piece_after(StOut *const *order, Py_ssize_t nout, const StPiece *p, size_t chunk, StPiece *out)
{
    Py_ssize_t i = p ? p->i : 0;
    uint64_t off = p ? p->off + p->n : 0;
    for (; i < nout; i++, off = 0) {
        if (off < order[i]->nbytes) {
            uint64_t left = order[i]->nbytes - off;
            *out = (StPiece){.i = i, .off = off, .n = (size_t)(left < chunk ? left : chunk), .slot = -1};
            return 1;
        }
    }
    return 0;
}

/* Whether a tensor's bytes go through the stager: device tensors always, every
 * tensor when the tests ask for it (`stage_bytes` > 0). */
static int
st_is_staged(const StOut *o, size_t stage_bytes)
{
    return stage_bytes || !o->is_cpu;
}

/* Queue piece `p` into the stager's next slot, if its tensor is staged (else it is
 * read in place and nothing happens). */
static int
st_stage(AtbStager *stager, int *next_slot, StOut *const *order, StPiece *p, size_t stage_bytes,
         PyObject *display)
{
    AtbError err;
    int rc;
    if (!st_is_staged(order[p->i], stage_bytes)) {
        return 0;
    }
    p->slot = *next_slot;
    *next_slot ^= 1;
    Py_BEGIN_ALLOW_THREADS
    rc = atb_stager_start(stager, p->slot, order[p->i]->tensor, (int64_t)p->off, (int64_t)p->n, &err);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        st_fail(display, "cannot read the bytes of tensor %R: %s", order[p->i]->name, err.msg);
    }
    return rc;
}

/* The data section, tensor after tensor in `order`, hashed as it goes (the digests
 * land in the header at their hash_pos).  CPU tensors are written from where they
 * lie (a contiguous copy first when they are not contiguous).  Other tensors go
 * through a stager's two host buffers, pinned when possible: the copy of the next
 * piece is queued before the current one is written, so device-to-host copies
 * overlap the writes and at most two chunks of host memory are used whatever the
 * tensor sizes.  `stage_bytes` > 0 (tests) sends every tensor through the stager,
 * in chunks of that size, to exercise the same pipeline without a device. */
static int
st_write_data(int fd, PyObject *display, StOut *const *order, Py_ssize_t nout, uint64_t total, StBuf *hdr,
              PyObject *progress, size_t stage_bytes)
{
    const size_t chunk = stage_bytes ? stage_bytes : ST_CHUNK;
    AtbStager *stager = NULL;
    AtbTensor *host = NULL; /* contiguous host image of order[host_of] */
    Py_ssize_t host_of = -1;
    AtbError err;
    StHash h;
    StPiece cur, nxt;
    int rc = -1, next_slot = 0, have_cur, have_nxt, any_staged = 0;
    uint64_t done = 0, next_report = ST_PROGRESS_EVERY;

    for (Py_ssize_t i = 0; i < nout; i++) {
        if (order[i]->nbytes == 0) { /* no piece will finish it */
            st_hash_init(&h);
            st_hex16(st_hash_digest(&h), hdr->data + order[i]->hash_pos);
        }
        else if (st_is_staged(order[i], stage_bytes)) {
            any_staged = 1;
        }
    }
    if (any_staged) {
        int r;
        Py_BEGIN_ALLOW_THREADS
        r = atb_stager_new(chunk, !stage_bytes, &stager, &err);
        if (r < 0 && !stage_bytes) { /* no page-locked memory: plain buffers, synchronous copies */
            r = atb_stager_new(chunk, 0, &stager, &err);
        }
        Py_END_ALLOW_THREADS
        if (r < 0) {
            st_fail(display, "cannot allocate the staging buffers: %s", err.msg);
            goto done;
        }
    }
    have_cur = st_piece_after(order, nout, NULL, chunk, &cur);
    if (have_cur && st_stage(stager, &next_slot, order, &cur, stage_bytes, display) < 0) {
        goto done;
    }
    while (have_cur) {
        StOut *o = order[cur.i];
        const char *data;
        int r;

        have_nxt = st_piece_after(order, nout, &cur, chunk, &nxt);
        if (have_nxt && st_stage(stager, &next_slot, order, &nxt, stage_bytes, display) < 0) {
            goto done;
        }
        if (cur.slot >= 0) {
            const void *p;
            Py_BEGIN_ALLOW_THREADS
            r = atb_stager_wait(stager, cur.slot, &p, &err);
            Py_END_ALLOW_THREADS
            if (r < 0) {
                st_fail(display, "cannot read the bytes of tensor %R: %s", o->name, err.msg);
                goto done;
            }
            data = p;
        }
        else {
            if (host_of != cur.i) {
                if (host != NULL) {
                    atb_free(host);
                    host = NULL;
                }
                Py_BEGIN_ALLOW_THREADS
                r = atb_host_contiguous(o->tensor, &host, &err);
                Py_END_ALLOW_THREADS
                if (r < 0) {
                    st_fail(display, "cannot read the bytes of tensor %R: %s", o->name, err.msg);
                    goto done;
                }
                host_of = cur.i;
                if (atb_nbytes(host) < 0 || (uint64_t)atb_nbytes(host) != o->nbytes) {
                    st_fail(display, "tensor %R changed size while being written", o->name);
                    goto done;
                }
            }
            data = (const char *)atb_data(host);
            if (data == NULL) { /* the bridge's failure sentinel (this piece has bytes) */
                st_fail(display, "cannot read the bytes of tensor %R", o->name);
                goto done;
            }
            data += cur.off;
        }

        if (cur.off == 0) {
            st_hash_init(&h);
        }
        if (st_write_nogil(fd, data, cur.n, &h, display) < 0) {
            goto done;
        }
        if (cur.off + cur.n == o->nbytes) {
            st_hex16(st_hash_digest(&h), hdr->data + o->hash_pos);
        }

        done += cur.n;
        if (PyErr_CheckSignals() < 0) {
            goto done;
        }
        if (done >= next_report && done < total) {
            next_report = done + ST_PROGRESS_EVERY;
            if (st_call_progress(progress, done, total) < 0) {
                goto done;
            }
        }
        cur = nxt;
        have_cur = have_nxt;
    }
    rc = st_call_progress(progress, done, total);

done:
    if (host != NULL) {
        atb_free(host);
    }
    atb_stager_free(stager); /* waits for a copy still in flight */
    return rc;
}

PyDoc_STRVAR(st_write_doc,
"st_write(path, tensors, metadata, *, progress=None)\n--\n\n"
"Write a safetensors-compatible file crash-safely: a temporary file in the same\n"
"folder, fsync, rename over `path`, fsync of the folder.  `tensors` maps names to\n"
"torch tensors (any device, any layout; stored C-contiguous; device tensors are\n"
"staged through two pinned host buffers, copies overlapping writes), `metadata` maps str to\n"
"str.  XXH64 checksums of every tensor are added to the metadata under 'checksums'\n"
"and 'checksum_algorithm' (reserved keys).  `progress(done_bytes, total_bytes)` is\n"
"called as data is written; an exception from it aborts the write.  On any error\n"
"the temporary file is removed and `path` is left as it was.");

static PyObject *
st_write(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"path", "tensors", "metadata", "progress", "_stage_bytes", NULL};
    PyObject *path = NULL, *tensors = NULL, *metadata = NULL, *progress = Py_None;
    Py_ssize_t stage_bytes = 0;
    PyObject *fsbytes = NULL, *display = NULL, *torch = NULL, *tensor_type = NULL, *items = NULL;
    PyObject *plain[3] = {NULL, NULL, NULL}; /* torch.Tensor, torch.nn.Parameter, torch.strided */
    PyObject *result = NULL;
    StOut *outs = NULL, **order = NULL;
    Py_ssize_t nout = 0, count = 0;
    StBuf hdr = {0}, tmp = {0};
    AtomicFile af = {.fd = -1};
    int fd = -1; /* af.fd, owned by af */
    AtbError err;
    (void)module;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!O!|$On:st_write", kwlist, &path, &PyDict_Type,
                                     &tensors, &PyDict_Type, &metadata, &progress, &stage_bytes)) {
        return NULL;
    }
    if (stage_bytes < 0 || (size_t)stage_bytes > ((size_t)1 << 30)) {
        PyErr_SetString(PyExc_ValueError, "st_write: _stage_bytes must be between 0 and 2**30");
        return NULL;
    }
    if (st_path_args(path, &fsbytes, &display) < 0) {
        goto error;
    }
    if (progress != Py_None && !PyCallable_Check(progress)) {
        PyErr_SetString(PyExc_TypeError, "st_write: progress must be callable or None");
        goto error;
    }
    torch = PyImport_ImportModule("torch");
    if (torch == NULL || (tensor_type = PyObject_GetAttrString(torch, "Tensor")) == NULL) {
        goto error;
    }
    {
        PyObject *nn = PyObject_GetAttrString(torch, "nn");
        plain[0] = Py_NewRef(tensor_type);
        plain[1] = nn ? PyObject_GetAttrString(nn, "Parameter") : NULL;
        Py_XDECREF(nn);
        if (plain[1] == NULL || (plain[2] = PyObject_GetAttrString(torch, "strided")) == NULL) {
            goto error;
        }
    }

    /* 1. Look at every tensor (no bytes are touched yet). */
    /* A snapshot: detach()/__dlpack__ run Python code that could change the dict. */
    items = PyDict_Items(tensors);
    if (items == NULL) {
        goto error;
    }
    count = PyList_GET_SIZE(items);
    outs = PyMem_Calloc((size_t)count + 1, sizeof(StOut));
    order = PyMem_Calloc((size_t)count + 1, sizeof(StOut *));
    if (outs == NULL || order == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    {
        for (Py_ssize_t idx = 0; idx < count; idx++) {
            PyObject *key = PyTuple_GET_ITEM(PyList_GET_ITEM(items, idx), 0);
            PyObject *value = PyTuple_GET_ITEM(PyList_GET_ITEM(items, idx), 1);
            StOut *o = &outs[nout];
            if (!PyUnicode_Check(key)) {
                PyErr_Format(PyExc_TypeError, "%U: tensor names must be str, not %.100s", display,
                             Py_TYPE(key)->tp_name);
                goto error;
            }
            if (PyUnicode_GetLength(key) == 0 || PyUnicode_CompareWithASCIIString(key, "__metadata__") == 0) {
                st_fail(display, "%R is not a valid tensor name", key);
                goto error;
            }
            if (!PyObject_TypeCheck(value, (PyTypeObject *)tensor_type)) {
                PyErr_Format(PyExc_TypeError, "%U: tensor %R is a %.100s, not a torch.Tensor", display, key,
                             Py_TYPE(value)->tp_name);
                goto error;
            }
            if (st_check_kind(value, key, display, plain) < 0) {
                goto error;
            }
            o->name = Py_NewRef(key);
            nout++;
            if (st_tensor_handle(value, &o->tensor, &err) < 0) {
                PyObject *what = PyUnicode_FromFormat("cannot read tensor %R", key);
                if (what != NULL) {
                    st_prefix_error(display, what);
                    Py_DECREF(what);
                }
                goto error;
            }
            o->dtype = st_dtype_by_code(atb_dtype(o->tensor));
            if (o->dtype < 0) {
                PyObject *dt = PyObject_GetAttrString(value, "dtype");
                if (dt != NULL) {
                    st_fail(display, "tensor %R has dtype %S, which the format cannot store", key, dt);
                    Py_DECREF(dt);
                }
                goto error;
            }
            /* -1 is the bridge's failure sentinel for each of these */
            int64_t nb = atb_nbytes(o->tensor);
            int ndim = atb_ndim(o->tensor);
            o->is_cpu = atb_is_cpu(o->tensor);
            if (nb < 0 || ndim < 0 || ndim > ST_MAX_NDIM || o->is_cpu < 0) {
                st_fail(display, "tensor %R has an unsupported shape", key);
                goto error;
            }
            for (int d = 0; d < ndim; d++) {
                if (atb_size(o->tensor, d) < 0) {
                    st_fail(display, "tensor %R has an unsupported shape", key);
                    goto error;
                }
            }
            o->nbytes = (uint64_t)nb;
            order[nout - 1] = o;
        }
    }
    /* Data order: larger items first, so every tensor starts on a multiple of its
     * item size (the data section itself starts ST_ALIGN-aligned). */
    qsort(order, (size_t)nout, sizeof(StOut *), st_cmp_out_align);
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < nout; i++) {
        order[i]->begin = total;
        total += order[i]->nbytes;
    }

    /* 2. The header, with zero placeholders for the checksums. */
    if (st_buf_str(&hdr, "{\"__metadata__\":{") < 0) {
        goto error;
    }
    {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(metadata, &pos, &key, &value)) {
            if (!PyUnicode_Check(key) || !PyUnicode_Check(value)) {
                PyErr_Format(PyExc_TypeError, "%U: metadata keys and values must be str (key %R)", display, key);
                goto error;
            }
            if (PyUnicode_CompareWithASCIIString(key, "checksums") == 0 ||
                PyUnicode_CompareWithASCIIString(key, "checksum_algorithm") == 0) {
                st_fail(display, "metadata key %R is reserved for the writer", key);
                goto error;
            }
            if (st_buf_json_str(&hdr, key) < 0 || st_buf_str(&hdr, ":") < 0 ||
                st_buf_json_str(&hdr, value) < 0 || st_buf_str(&hdr, ",") < 0) {
                goto error;
            }
        }
    }
    if (st_buf_str(&hdr, "\"checksum_algorithm\":\"xxh64\",\"checksums\":\"{") < 0) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < nout; i++) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(outs[i].name, &n);
        tmp.len = 0;
        if (s == NULL || st_buf_json_body(&tmp, s, (size_t)n) < 0 ||
            st_buf_str(&hdr, i ? ",\\\"" : "\\\"") < 0 || st_buf_json_body(&hdr, tmp.data, tmp.len) < 0 ||
            st_buf_str(&hdr, "\\\":\\\"") < 0) {
            goto error;
        }
        outs[i].hash_pos = hdr.len;
        if (st_buf_str(&hdr, "0000000000000000\\\"") < 0) {
            goto error;
        }
    }
    if (st_buf_str(&hdr, "}\"}") < 0) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < nout; i++) {
        StOut *o = &outs[i];
        char num[64];
        if (st_buf_str(&hdr, ",") < 0 || st_buf_json_str(&hdr, o->name) < 0 ||
            st_buf_str(&hdr, ":{\"dtype\":\"") < 0 || st_buf_str(&hdr, st_dtypes[o->dtype].name) < 0 ||
            st_buf_str(&hdr, "\",\"shape\":[") < 0) {
            goto error;
        }
        int ndim = atb_ndim(o->tensor);
        for (int d = 0; d < ndim; d++) {
            snprintf(num, sizeof(num), d ? ",%lld" : "%lld", (long long)atb_size(o->tensor, d));
            if (st_buf_str(&hdr, num) < 0) {
                goto error;
            }
        }
        snprintf(num, sizeof(num), "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)o->begin,
                 (unsigned long long)(o->begin + o->nbytes));
        if (st_buf_str(&hdr, num) < 0) {
            goto error;
        }
    }
    if (st_buf_str(&hdr, "}") < 0) {
        goto error;
    }
    {
        /* Pad the JSON with spaces so the data starts ST_ALIGN-aligned, then put
         * the 8-byte length in front. */
        size_t json_len = hdr.len;
        size_t padded = json_len + (ST_ALIGN - (8 + json_len) % ST_ALIGN) % ST_ALIGN;
        if (padded > ST_MAX_HEADER) {
            st_fail(display, "the header would be %zu bytes, over the %llu-byte limit", padded,
                    (unsigned long long)ST_MAX_HEADER);
            goto error;
        }
        if (st_buf_reserve(&hdr, padded - json_len + 8) < 0) {
            goto error;
        }
        memset(hdr.data + json_len, ' ', padded - json_len);
        /* Shift right by 8 to put the length in front. */
        memmove(hdr.data + 8, hdr.data, padded);
        for (int i = 0; i < 8; i++) {
            hdr.data[i] = (char)(((uint64_t)padded >> (8 * i)) & 0xff);
        }
        hdr.len = padded + 8;
        for (Py_ssize_t i = 0; i < nout; i++) {
            outs[i].hash_pos += 8;
        }
    }

    /* 3. The temporary file next to the target. */
    {
        if (strlen(PyBytes_AS_STRING(fsbytes)) != (size_t)PyBytes_GET_SIZE(fsbytes)) {
            st_fail(display, "not a file name");
            goto error;
        }
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = atomic_file_open(&af, PyBytes_AS_STRING(fsbytes));
        if (rc == 0) {
            atomic_file_start_writeback(&af); /* disk writes overlap hashing and staging */
        }
        Py_END_ALLOW_THREADS
        if (rc < 0) {
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, display);
            goto error;
        }
        fd = af.fd;
    }

    /* 4. Header (placeholders), then every tensor's bytes, hashed as they go. */
    if (st_write_nogil(fd, hdr.data, hdr.len, NULL, display) < 0) {
        goto error;
    }
    if (st_write_data(fd, display, order, nout, total, &hdr, progress, (size_t)stage_bytes) < 0) {
        goto error;
    }

    /* 5. Final header, then fsync, rename, fsync the folder. */
    {
        int rc, saved_errno = 0;
        off_t zero = 0;
        Py_BEGIN_ALLOW_THREADS
        rc = st_write_all(fd, hdr.data, hdr.len, &zero);
        if (rc == 0) {
            rc = atomic_file_commit(&af);
        }
        saved_errno = errno;
        Py_END_ALLOW_THREADS
        if (rc < 0) {
            errno = saved_errno;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, display);
            goto error;
        }
    }

    result = Py_NewRef(Py_None);

error:
    /* closes the temp file and removes it unless it was committed */
    atomic_file_close(&af);
    for (Py_ssize_t i = 0; i < nout; i++) {
        Py_XDECREF(outs[i].name);
        if (outs[i].tensor) {
            atb_free(outs[i].tensor);
        }
    }
    PyMem_Free(outs);
    PyMem_Free(order);
    PyMem_Free(hdr.data);
    PyMem_Free(tmp.data);
    Py_XDECREF(fsbytes);
    Py_XDECREF(display);
    Py_XDECREF(torch);
    Py_XDECREF(tensor_type);
    Py_XDECREF(plain[0]);
    Py_XDECREF(plain[1]);
    Py_XDECREF(plain[2]);
    Py_XDECREF(items);
    return result;
}

/* ------------------------------------------------------------------ header parser */
/* A strict, bounds-checked JSON parser for exactly the safetensors header schema.
 * Every read checks j->p < j->end; nothing is allocated beyond what the (capped)
 * header bytes can hold; there is no recursion. */

typedef struct {
    PyObject *name;  /* strong */
    int dtype;
    int ndim;
    size_t shape_at; /* index into the shape pool */
    uint64_t begin, end;
} StEntry;

typedef struct {
    const unsigned char *start, *p, *end;
    PyObject *display;
    StEntry *entries;
    size_t nentries, cap_entries;
    int64_t *shapes;
    size_t nshapes, cap_shapes;
} StHeader;

static void
st_header_clear(StHeader *h)
{
    for (size_t i = 0; i < h->nentries; i++) {
        Py_XDECREF(h->entries[i].name);
    }
    PyMem_Free(h->entries);
    PyMem_Free(h->shapes);
    h->entries = NULL;
    h->shapes = NULL;
    h->nentries = h->nshapes = 0;
}

static PyObject *
st_json_fail(StHeader *h, const char *what)
{
    return st_fail(h->display, "invalid header JSON at byte %zd: %s", (Py_ssize_t)(h->p - h->start), what);
}

static void
st_ws(StHeader *h)
{
    while (h->p < h->end && (*h->p == ' ' || *h->p == '\t' || *h->p == '\n' || *h->p == '\r')) {
        h->p++;
    }
}

static int
st_expect(StHeader *h, char c, const char *what)
{
    st_ws(h);
    if (h->p >= h->end || *h->p != (unsigned char)c) {
        st_json_fail(h, h->p >= h->end ? "unexpected end of the header" : what);
        return -1;
    }
    h->p++;
    return 0;
}

static int
st_hexval(unsigned char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

static int
st_read_u4(StHeader *h, unsigned *out)
{
    if (h->end - h->p < 4) {
        st_json_fail(h, "truncated \\u escape");
        return -1;
    }
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int d = st_hexval(h->p[i]);
        if (d < 0) {
            st_json_fail(h, "bad \\u escape");
            return -1;
        }
        v = v * 16 + (unsigned)d;
    }
    h->p += 4;
    *out = v;
    return 0;
}

/* A JSON string -> new str. Escapes decoded, raw bytes strict UTF-8. */
static PyObject *
st_json_string(StHeader *h)
{
    st_ws(h);
    if (h->p >= h->end || *h->p != '"') {
        return st_json_fail(h, h->p >= h->end ? "unexpected end of the header" : "expected a string");
    }
    h->p++;
    /* The decoded text is never longer than the raw text. */
    const unsigned char *q = h->p;
    while (q < h->end && *q != '"') {
        q += (*q == '\\' && q + 1 < h->end) ? 2 : 1;
    }
    if (q >= h->end) {
        return st_json_fail(h, "unterminated string");
    }
    size_t cap = (size_t)(q - h->p) + 1;
    char *buf = PyMem_Malloc(cap);
    if (buf == NULL) {
        return PyErr_NoMemory();
    }
    size_t n = 0;
    PyObject *result = NULL;
    while (h->p < q) {
        unsigned char c = *h->p;
        if (c < 0x20) {
            st_json_fail(h, "control character in a string");
            goto done;
        }
        if (c != '\\') {
            buf[n++] = (char)c;
            h->p++;
            continue;
        }
        h->p++;
        c = *h->p++;
        switch (c) {
        case '"': buf[n++] = '"'; break;
        case '\\': buf[n++] = '\\'; break;
        case '/': buf[n++] = '/'; break;
        case 'b': buf[n++] = '\b'; break;
        case 'f': buf[n++] = '\f'; break;
        case 'n': buf[n++] = '\n'; break;
        case 'r': buf[n++] = '\r'; break;
        case 't': buf[n++] = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (st_read_u4(h, &cp) < 0) {
                goto done;
            }
            if (cp >= 0xDC00 && cp <= 0xDFFF) {
                st_json_fail(h, "lone low surrogate in a \\u escape");
                goto done;
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (h->end - h->p < 2 || h->p[0] != '\\' || h->p[1] != 'u') {
                    st_json_fail(h, "lone high surrogate in a \\u escape");
                    goto done;
                }
                h->p += 2;
                if (st_read_u4(h, &lo) < 0) {
                    goto done;
                }
                if (lo < 0xDC00 || lo > 0xDFFF) {
                    st_json_fail(h, "bad surrogate pair in a \\u escape");
                    goto done;
                }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            if (cp < 0x80) {
                buf[n++] = (char)cp;
            }
            else if (cp < 0x800) {
                buf[n++] = (char)(0xC0 | (cp >> 6));
                buf[n++] = (char)(0x80 | (cp & 0x3F));
            }
            else if (cp < 0x10000) {
                buf[n++] = (char)(0xE0 | (cp >> 12));
                buf[n++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                buf[n++] = (char)(0x80 | (cp & 0x3F));
            }
            else {
                buf[n++] = (char)(0xF0 | (cp >> 18));
                buf[n++] = (char)(0x80 | ((cp >> 12) & 0x3F));
                buf[n++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                buf[n++] = (char)(0x80 | (cp & 0x3F));
            }
            break;
        }
        default:
            h->p--;
            st_json_fail(h, "bad escape in a string");
            goto done;
        }
        if (h->p > q) { /* an escape ran into the closing quote */
            st_json_fail(h, "unterminated string");
            goto done;
        }
    }
    h->p = q + 1;
    result = PyUnicode_DecodeUTF8(buf, (Py_ssize_t)n, "strict");
    if (result == NULL) {
        PyErr_Clear();
        st_json_fail(h, "a string is not valid UTF-8");
    }
done:
    PyMem_Free(buf);
    return result;
}

/* A non-negative JSON integer that fits in int64. */
/* A string that is only compared, never kept (field names, dtypes): plain
 * printable ASCII without escapes is matched in place, with no allocation;
 * anything else goes through st_json_string (*owned holds that str). */
static int
st_json_word(StHeader *h, const char **s, Py_ssize_t *n, PyObject **owned)
{
    *owned = NULL;
    st_ws(h);
    if (h->p < h->end && *h->p == '"') {
        const unsigned char *q = h->p + 1;
        while (q < h->end && *q != '"' && *q != '\\' && *q >= 0x20 && *q < 0x7f) {
            q++;
        }
        if (q < h->end && *q == '"') {
            *s = (const char *)h->p + 1;
            *n = (Py_ssize_t)(q - h->p - 1);
            h->p = q + 1;
            return 0;
        }
    }
    *owned = st_json_string(h);
    if (*owned == NULL) {
        return -1;
    }
    *s = PyUnicode_AsUTF8AndSize(*owned, n);
    if (*s == NULL) {
        Py_CLEAR(*owned);
        return -1;
    }
    return 0;
}

static int
st_word_is(const char *s, Py_ssize_t n, const char *lit)
{
    return (size_t)n == strlen(lit) && memcmp(s, lit, (size_t)n) == 0;
}

static int
st_json_uint(StHeader *h, const char *what, PyObject *name, uint64_t *out)
{
    st_ws(h);
    if (h->p < h->end && *h->p == '-') {
        st_fail(h->display, "tensor %R: %s must be non-negative integers", name, what);
        return -1;
    }
    if (h->p >= h->end || *h->p < '0' || *h->p > '9') {
        st_fail(h->display, "tensor %R: %s must be non-negative integers", name, what);
        return -1;
    }
    uint64_t v = 0;
    const unsigned char *first = h->p;
    while (h->p < h->end && *h->p >= '0' && *h->p <= '9') {
        unsigned d = (unsigned)(*h->p - '0');
        if (v > ((uint64_t)INT64_MAX - d) / 10) {
            st_fail(h->display, "tensor %R: %s: a number over 2**63-1", name, what);
            return -1;
        }
        v = v * 10 + d;
        h->p++;
    }
    if (*first == '0' && h->p - first > 1) {
        st_json_fail(h, "leading zero in a number");
        return -1;
    }
    if (h->p < h->end && (*h->p == '.' || *h->p == 'e' || *h->p == 'E')) {
        st_fail(h->display, "tensor %R: %s must be non-negative integers", name, what);
        return -1;
    }
    *out = v;
    return 0;
}

/* '{' "k": "v", ... '}' into `dict` (str -> str), duplicate keys rejected. */
static int
st_json_str_map(StHeader *h, PyObject *dict, const char *what)
{
    if (st_expect(h, '{', "expected an object") < 0) {
        return -1;
    }
    st_ws(h);
    if (h->p < h->end && *h->p == '}') {
        h->p++;
        return 0;
    }
    for (;;) {
        PyObject *k = st_json_string(h), *v = NULL;
        if (k == NULL) {
            return -1;
        }
        if (st_expect(h, ':', "expected ':'") < 0) {
            Py_DECREF(k);
            return -1;
        }
        st_ws(h);
        if (h->p < h->end && *h->p != '"') {
            st_fail(h->display, "%s value of %R must be a string", what, k);
            Py_DECREF(k);
            return -1;
        }
        v = st_json_string(h);
        int dup = v ? PyDict_Contains(dict, k) : -1;
        if (dup == 1) {
            st_fail(h->display, "duplicate %s key %R", what, k);
        }
        int rc = (dup == 0) ? PyDict_SetItem(dict, k, v) : -1;
        Py_DECREF(k);
        Py_XDECREF(v);
        if (rc < 0) {
            return -1;
        }
        st_ws(h);
        if (h->p < h->end && *h->p == ',') {
            h->p++;
            continue;
        }
        return st_expect(h, '}', "expected ',' or '}'");
    }
}

static int
st_push_shape(StHeader *h, int64_t v)
{
    if (h->nshapes == h->cap_shapes) {
        size_t cap = h->cap_shapes ? h->cap_shapes * 2 : 64;
        int64_t *s = PyMem_Realloc(h->shapes, cap * sizeof(int64_t));
        if (s == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        h->shapes = s;
        h->cap_shapes = cap;
    }
    h->shapes[h->nshapes++] = v;
    return 0;
}

/* {"dtype": "...", "shape": [...], "data_offsets": [b, e]} for tensor `name`. */
static int
st_json_entry(StHeader *h, PyObject *name)
{
    StEntry e = {0};
    int seen = 0; /* 1 dtype, 2 shape, 4 data_offsets */
    e.shape_at = h->nshapes;
    st_ws(h);
    if (h->p >= h->end) {
        st_json_fail(h, "unexpected end of the header");
        return -1;
    }
    if (*h->p != '{') {
        st_fail(h->display, "tensor %R: its entry must be an object", name);
        return -1;
    }
    h->p++;
    for (;;) {
        const char *ks;
        Py_ssize_t kn;
        PyObject *k = NULL;
        if (st_json_word(h, &ks, &kn, &k) < 0) {
            return -1;
        }
        int bit = st_word_is(ks, kn, "dtype")          ? 1
                  : st_word_is(ks, kn, "shape")        ? 2
                  : st_word_is(ks, kn, "data_offsets") ? 4
                                                       : 0;
        if (bit == 0 || (seen & bit)) {
            if (k == NULL) {
                k = PyUnicode_FromStringAndSize(ks, kn);
            }
            if (k != NULL) {
                st_fail(h->display, bit ? "tensor %R: duplicate field %R" : "tensor %R: unknown field %R", name, k);
            }
            Py_XDECREF(k);
            return -1;
        }
        Py_XDECREF(k);
        if (st_expect(h, ':', "expected ':'") < 0) {
            return -1;
        }
        seen |= bit;
        if (bit == 1) {
            const char *ds;
            Py_ssize_t dn;
            PyObject *dt = NULL;
            if (st_json_word(h, &ds, &dn, &dt) < 0) {
                return -1;
            }
            e.dtype = st_dtype_by_name(ds, dn);
            if (e.dtype < 0) {
                if (dt == NULL) {
                    dt = PyUnicode_FromStringAndSize(ds, dn);
                }
                if (dt != NULL) {
                    st_fail(h->display, "tensor %R: unknown dtype %R", name, dt);
                }
                Py_XDECREF(dt);
                return -1;
            }
            Py_XDECREF(dt);
        }
        else if (bit == 2) {
            st_ws(h);
            if (h->p >= h->end || *h->p != '[') {
                st_fail(h->display, "tensor %R: shape must be a list of non-negative integers", name);
                return -1;
            }
            h->p++;
            st_ws(h);
            if (h->p < h->end && *h->p == ']') {
                h->p++;
            }
            else {
                for (;;) {
                    uint64_t v;
                    if (st_json_uint(h, "shape entries", name, &v) < 0) {
                        return -1;
                    }
                    if (++e.ndim > ST_MAX_NDIM) {
                        st_fail(h->display, "tensor %R: more than %d dimensions", name, ST_MAX_NDIM);
                        return -1;
                    }
                    if (st_push_shape(h, (int64_t)v) < 0) {
                        return -1;
                    }
                    st_ws(h);
                    if (h->p < h->end && *h->p == ',') {
                        h->p++;
                        continue;
                    }
                    if (st_expect(h, ']', "expected ',' or ']'") < 0) {
                        return -1;
                    }
                    break;
                }
            }
        }
        else {
            if (st_expect(h, '[', "expected '[' for data_offsets") < 0 ||
                st_json_uint(h, "data_offsets", name, &e.begin) < 0) {
                return -1;
            }
            st_ws(h);
            if (h->p >= h->end || *h->p != ',') {
                st_fail(h->display, "tensor %R: data_offsets must be exactly [begin, end]", name);
                return -1;
            }
            h->p++;
            if (st_json_uint(h, "data_offsets", name, &e.end) < 0) {
                return -1;
            }
            st_ws(h);
            if (h->p >= h->end || *h->p != ']') {
                st_fail(h->display, "tensor %R: data_offsets must be exactly [begin, end]", name);
                return -1;
            }
            h->p++;
        }
        st_ws(h);
        if (h->p < h->end && *h->p == ',') {
            h->p++;
            continue;
        }
        if (st_expect(h, '}', "expected ',' or '}'") < 0) {
            return -1;
        }
        break;
    }
    if (seen != 7) {
        st_fail(h->display, "tensor %R: missing field %s", name,
                !(seen & 1) ? "'dtype'" : !(seen & 2) ? "'shape'" : "'data_offsets'");
        return -1;
    }
    if (h->nentries == h->cap_entries) {
        size_t cap = h->cap_entries ? h->cap_entries * 2 : 16;
        StEntry *es = PyMem_Realloc(h->entries, cap * sizeof(StEntry));
        if (es == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        h->entries = es;
        h->cap_entries = cap;
    }
    e.name = Py_NewRef(name);
    h->entries[h->nentries++] = e;
    return 0;
}

static int
st_cmp_entry_names(const void *a, const void *b)
{
    const StEntry *x = *(const StEntry *const *)a, *y = *(const StEntry *const *)b;
    return PyUnicode_Compare(x->name, y->name); /* str vs str: cannot fail */
}

static int
st_cmp_entry_offsets(const void *a, const void *b)
{
    const StEntry *x = *(const StEntry *const *)a, *y = *(const StEntry *const *)b;
    if (x->begin != y->begin) {
        return x->begin < y->begin ? -1 : 1;
    }
    if (x->end != y->end) {
        return x->end < y->end ? -1 : 1;
    }
    return x < y ? -1 : (x > y);
}

/* Parse and validate the header bytes `json[0:n]` of a file whose data section is
 * `data_len` bytes. Fills h->entries (header order) and `metadata`. */
static int
st_parse_header(StHeader *h, const unsigned char *json, size_t n, uint64_t data_len, PyObject *metadata)
{
    StEntry **sorted = NULL;
    int rc = -1;
    h->start = h->p = json;
    h->end = json + n;
    if (n == 0 || json[0] != '{') {
        st_fail(h->display, "the header is not a JSON object (it must start with '{')");
        goto error;
    }
    int have_meta = 0;
    h->p++;
    st_ws(h);
    if (h->p < h->end && *h->p == '}') {
        h->p++;
    }
    else {
        for (;;) {
            PyObject *k = st_json_string(h);
            if (k == NULL) {
                goto error;
            }
            if (st_expect(h, ':', "expected ':'") < 0) {
                Py_DECREF(k);
                goto error;
            }
            if (PyUnicode_CompareWithASCIIString(k, "__metadata__") == 0) {
                Py_DECREF(k);
                if (have_meta) {
                    st_fail(h->display, "duplicate key '__metadata__' in the header");
                    goto error;
                }
                have_meta = 1;
                st_ws(h);
                if (h->p >= h->end || *h->p != '{') {
                    st_fail(h->display, "__metadata__ must be an object of strings");
                    goto error;
                }
                if (st_json_str_map(h, metadata, "metadata") < 0) {
                    goto error;
                }
            }
            else {
                /* duplicate names are found once all are read, by sorting */
                int r = st_json_entry(h, k);
                Py_DECREF(k);
                if (r < 0) {
                    goto error;
                }
            }
            st_ws(h);
            if (h->p < h->end && *h->p == ',') {
                h->p++;
                continue;
            }
            if (st_expect(h, '}', "expected ',' or '}'") < 0) {
                goto error;
            }
            break;
        }
    }
    st_ws(h);
    if (h->p != h->end) {
        st_json_fail(h, "trailing bytes after the header object");
        goto error;
    }

    /* Sizes, then the layout: sorted by offset, contiguous from 0, covering all. */
    for (size_t i = 0; i < h->nentries; i++) {
        StEntry *e = &h->entries[i];
        uint64_t numel = 1;
        for (int d = 0; d < e->ndim; d++) {
            uint64_t s = (uint64_t)h->shapes[e->shape_at + (size_t)d];
            if (s != 0 && numel > (uint64_t)INT64_MAX / s) {
                numel = UINT64_MAX; /* overflow: cannot match any real span */
                break;
            }
            numel *= s;
        }
        if (numel != UINT64_MAX) {
            for (int d = 0; d < e->ndim; d++) {
                if (h->shapes[e->shape_at + (size_t)d] == 0) {
                    numel = 0;
                }
            }
        }
        if (e->end < e->begin) {
            st_fail(h->display, "tensor %R: data_offsets [%llu, %llu] end before they begin", e->name,
                    (unsigned long long)e->begin, (unsigned long long)e->end);
            goto error;
        }
        if (e->end > data_len) {
            st_fail(h->display, "tensor %R: data_offsets [%llu, %llu] run past the %llu-byte data section",
                    e->name, (unsigned long long)e->begin, (unsigned long long)e->end,
                    (unsigned long long)data_len);
            goto error;
        }
        uint64_t isz = (uint64_t)st_dtypes[e->dtype].itemsize;
        if (numel == UINT64_MAX || numel > (uint64_t)INT64_MAX / isz || numel * isz != e->end - e->begin) {
            st_fail(h->display, "tensor %R: shape and dtype %s need %s%llu bytes but data_offsets span %llu",
                    e->name, st_dtypes[e->dtype].name, numel == UINT64_MAX || numel > (uint64_t)INT64_MAX / isz ? "over " : "",
                    (unsigned long long)(numel == UINT64_MAX || numel > (uint64_t)INT64_MAX / isz ? (uint64_t)INT64_MAX : numel * isz),
                    (unsigned long long)(e->end - e->begin));
            goto error;
        }
    }
    sorted = PyMem_Calloc(h->nentries + 1, sizeof(StEntry *));
    if (sorted == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    for (size_t i = 0; i < h->nentries; i++) {
        sorted[i] = &h->entries[i];
    }
    /* Unique names: sorted by name, a duplicate sits next to its twin (O(n log n)
     * time, no per-name hash table). */
    qsort(sorted, h->nentries, sizeof(StEntry *), st_cmp_entry_names);
    for (size_t i = 1; i < h->nentries; i++) {
        if (PyUnicode_Compare(sorted[i - 1]->name, sorted[i]->name) == 0) {
            st_fail(h->display, "duplicate tensor name %R in the header", sorted[i]->name);
            goto error;
        }
    }
    qsort(sorted, h->nentries, sizeof(StEntry *), st_cmp_entry_offsets);
    uint64_t at = 0;
    for (size_t i = 0; i < h->nentries; i++) {
        StEntry *e = sorted[i];
        if (e->begin < at) {
            st_fail(h->display, "tensor %R: data_offsets [%llu, %llu] overlap tensor %R", e->name,
                    (unsigned long long)e->begin, (unsigned long long)e->end, sorted[i - 1]->name);
            goto error;
        }
        if (e->begin > at) {
            st_fail(h->display, "tensor %R: a gap of %llu bytes before its data_offsets [%llu, %llu]", e->name,
                    (unsigned long long)(e->begin - at), (unsigned long long)e->begin,
                    (unsigned long long)e->end);
            goto error;
        }
        at = e->end;
    }
    if (at != data_len) {
        st_fail(h->display, "the data section has %llu bytes that no tensor covers (tensors end at %llu of %llu)",
                (unsigned long long)(data_len - at), (unsigned long long)at, (unsigned long long)data_len);
        goto error;
    }
    rc = 0;
error:
    PyMem_Free(sorted);
    return rc;
}

/* Open `fsbytes`, read and validate its header. On success *fd_out is the open file
 * (when fd_out is not NULL), *hdr_len the header's byte length, *size the file size. */
static int
st_load_header(PyObject *fsbytes, PyObject *display, StHeader *h, PyObject *metadata, int *fd_out,
               uint64_t *hdr_len, uint64_t *size)
{
    int fd = -1, rc = -1;
    unsigned char *json = NULL;
    struct stat stt;
    unsigned char len8[8];

    fd = open(PyBytes_AS_STRING(fsbytes), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, display);
        goto error;
    }
    if (fstat(fd, &stt) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, display);
        goto error;
    }
    if (!S_ISREG(stt.st_mode)) {
        st_fail(display, "not a regular file");
        goto error;
    }
    *size = (uint64_t)stt.st_size;
    if (*size < 8) {
        st_fail(display, "the file is %llu bytes, too short for the 8-byte header length",
                (unsigned long long)*size);
        goto error;
    }
    if (st_read_all(fd, (char *)len8, 8, 0) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, display);
        goto error;
    }
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) {
        n = (n << 8) | len8[i];
    }
    if (n > ST_MAX_HEADER) {
        st_fail(display, "header length %llu is over the %llu-byte limit", (unsigned long long)n,
                (unsigned long long)ST_MAX_HEADER);
        goto error;
    }
    if (n > *size - 8) {
        st_fail(display, "header length %llu runs past the end of the file (%llu bytes)", (unsigned long long)n,
                (unsigned long long)*size);
        goto error;
    }
    json = PyMem_Malloc(n ? (size_t)n : 1);
    if (json == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    int r, saved_errno = 0;
    Py_BEGIN_ALLOW_THREADS
    r = st_read_all(fd, (char *)json, (size_t)n, 8);
    saved_errno = errno;
    Py_END_ALLOW_THREADS
    if (r < 0) {
        errno = saved_errno;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, display);
        goto error;
    }
    if (st_parse_header(h, json, (size_t)n, *size - 8 - n, metadata) < 0) {
        goto error;
    }
    *hdr_len = n;
    rc = 0;
error:
    PyMem_Free(json);
    if (fd >= 0 && (rc < 0 || fd_out == NULL)) {
        close(fd);
    }
    else if (fd_out != NULL) {
        *fd_out = fd;
    }
    return rc;
}

/* ------------------------------------------------------------------ reader */

typedef struct {
    atomic_long refs;
    void *addr;
    size_t len;
} StMap;

/* Runs when the last tensor over the mapping goes; no Python, maybe no GIL. */
static void
st_map_release(void *ctx)
{
    StMap *m = ctx;
    if (atomic_fetch_sub(&m->refs, 1) == 1) {
        munmap(m->addr, m->len);
        free(m);
    }
}

static void
st_dlpack_capsule_destructor(PyObject *cap)
{
    if (PyCapsule_IsValid(cap, "dltensor")) {
        atb_dlpack_free(PyCapsule_GetPointer(cap, "dltensor"));
    }
}

/* A torch.Tensor (new reference) for entry `e` over the mapping. */
static PyObject *
st_make_tensor(StMap *map, const StHeader *h, const StEntry *e, char *data, PyObject *from_dlpack)
{
    AtbTensor *t = NULL, *copy = NULL;
    AtbError err;
    void *dlm = NULL;
    PyObject *cap = NULL, *result = NULL;
    char *ptr = data + e->begin;

    atomic_fetch_add(&map->refs, 1);
    if (atb_from_blob(ptr, st_dtypes[e->dtype].code, h->shapes + e->shape_at, e->ndim, st_map_release, map, &t,
                      &err) < 0) {
        /* The bridge's contract: on failure it has not called (and never will call)
         * st_map_release, so the reference taken above is still ours to drop. */
        st_map_release(map);
        st_fail(h->display, "tensor %R: its shape cannot be made into a tensor (%s)", e->name, err.msg);
        goto error;
    }
    if ((uintptr_t)ptr % (uintptr_t)st_dtypes[e->dtype].itemsize != 0) {
        /* Misaligned in a foreign file: give this one tensor its own memory. */
        if (atb_clone(t, &copy, &err) < 0) {
            st_fail(h->display, "tensor %R: %s", e->name, err.msg);
            goto error;
        }
        atb_free(t);
        t = copy;
        copy = NULL;
    }
    if (atb_to_dlpack(t, &dlm, &err) < 0) {
        st_fail(h->display, "tensor %R: %s", e->name, err.msg);
        goto error;
    }
    cap = PyCapsule_New(dlm, "dltensor", st_dlpack_capsule_destructor);
    if (cap == NULL) {
        atb_dlpack_free(dlm);
        goto error;
    }
    result = PyObject_CallOneArg(from_dlpack, cap);
error:
    Py_XDECREF(cap);
    if (t != NULL) {
        atb_free(t);
    }
    return result;
}

/* The hash pass of st_verify, on up to ST_HASH_THREADS threads when there is
 * enough data: each takes the next unhashed tensor (one tensor is hashed by one
 * thread, XXH64 being sequential). No Python, called without the GIL. */
#define ST_HASH_THREADS 8
#define ST_HASH_PARALLEL_MIN ((uint64_t)64 << 20)

typedef struct {
    const StHeader *h;
    const char *data;
    uint64_t *actual;
    atomic_size_t next;
} StHashJob;

static void *
st_hash_worker(void *arg)
{
    StHashJob *job = arg;
    for (;;) {
        size_t i = atomic_fetch_add(&job->next, 1);
        if (i >= job->h->nentries) {
            return NULL;
        }
        const StEntry *e = &job->h->entries[i];
        job->actual[i] = st_xxh64_buffer(job->data + e->begin, (size_t)(e->end - e->begin));
    }
}

static void
st_hash_all(const StHeader *h, const char *data, uint64_t *actual)
{
    StHashJob job = {.h = h, .data = data, .actual = actual};
    atomic_init(&job.next, 0);
    pthread_t threads[ST_HASH_THREADS];
    int started = 0;
    uint64_t total = 0, biggest = 0;
    for (size_t i = 0; i < h->nentries; i++) {
        uint64_t n = h->entries[i].end - h->entries[i].begin;
        total += n;
        biggest = n > biggest ? n : biggest;
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int want = cpus > 1 ? (int)(cpus < ST_HASH_THREADS ? cpus : ST_HASH_THREADS) : 1;
    if (total < ST_HASH_PARALLEL_MIN || total - biggest < ST_HASH_PARALLEL_MIN / 2 || h->nentries < 2) {
        want = 1; /* small, or one tensor is nearly everything: threads buy nothing */
    }
    for (int t = 1; t < want; t++) { /* this thread is worker 0 */
        if (pthread_create(&threads[started], NULL, st_hash_worker, &job) != 0) {
            break; /* fewer helpers; the work still gets done */
        }
        started++;
    }
    st_hash_worker(&job);
    for (int t = 0; t < started; t++) {
        pthread_join(threads[t], NULL);
    }
}

/* Check the stored checksums of every entry against the mapped bytes. */
static int
st_verify(StHeader *h, PyObject *metadata, const char *data)
{
    PyObject *algo = NULL, *text = NULL, *sums = NULL, *value = NULL;
    uint64_t *expected = NULL, *actual = NULL;
    int rc = -1;
    StHeader sub = {0};

    PyObject *k1 = PyUnicode_FromString("checksums"), *k2 = PyUnicode_FromString("checksum_algorithm");
    int bad = k1 == NULL || k2 == NULL || PyDict_GetItemRef(metadata, k1, &text) < 0 ||
              PyDict_GetItemRef(metadata, k2, &algo) < 0;
    Py_XDECREF(k1);
    Py_XDECREF(k2);
    if (bad) {
        goto error;
    }
    if (text == NULL) {
        st_fail(h->display, "no checksums to verify (the metadata has no 'checksums')");
        goto error;
    }
    if (algo == NULL || PyUnicode_CompareWithASCIIString(algo, "xxh64") != 0) {
        st_fail(h->display, "unsupported checksum_algorithm %R (this build checks 'xxh64')", algo ? algo : Py_None);
        goto error;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(text, &n);
    sums = PyDict_New();
    if (s == NULL || sums == NULL) {
        goto error;
    }
    sub.display = h->display;
    sub.start = sub.p = (const unsigned char *)s;
    sub.end = sub.start + n;
    if (st_json_str_map(&sub, sums, "checksums") < 0) {
        PyObject *what = PyUnicode_FromString("the 'checksums' metadata is malformed");
        if (what != NULL) {
            st_prefix_error(h->display, what);
            Py_DECREF(what);
        }
        goto error;
    }
    st_ws(&sub);
    if (sub.p != sub.end) {
        st_fail(h->display, "the 'checksums' metadata has trailing bytes");
        goto error;
    }
    if ((size_t)PyDict_GET_SIZE(sums) != h->nentries) {
        st_fail(h->display, "the 'checksums' metadata lists %zd tensors but the file has %zu",
                PyDict_GET_SIZE(sums), h->nentries);
        goto error;
    }
    expected = PyMem_Calloc(h->nentries + 1, sizeof(uint64_t));
    actual = PyMem_Calloc(h->nentries + 1, sizeof(uint64_t));
    if (expected == NULL || actual == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    for (size_t i = 0; i < h->nentries; i++) {
        if (PyDict_GetItemRef(sums, h->entries[i].name, &value) < 0) {
            goto error;
        }
        if (value == NULL) {
            st_fail(h->display, "tensor %R has no checksum", h->entries[i].name);
            goto error;
        }
        Py_ssize_t vn;
        const char *v = PyUnicode_AsUTF8AndSize(value, &vn);
        if (v == NULL) {
            goto error;
        }
        uint64_t x = 0;
        for (Py_ssize_t k = 0; k < vn; k++) {
            int d = st_hexval((unsigned char)v[k]);
            x = (x << 4) | (uint64_t)(d < 0 ? 0 : d);
            if (d < 0) {
                vn = -1;
                break;
            }
        }
        if (vn != 16) {
            st_fail(h->display, "tensor %R: checksum %R is not 16 hex digits", h->entries[i].name, value);
            goto error;
        }
        expected[i] = x;
        Py_CLEAR(value);
    }
    Py_BEGIN_ALLOW_THREADS
    st_hash_all(h, data, actual);
    Py_END_ALLOW_THREADS
    for (size_t i = 0; i < h->nentries; i++) {
        if (actual[i] != expected[i]) {
            char a[17] = {0}, b[17] = {0};
            st_hex16(expected[i], a);
            st_hex16(actual[i], b);
            st_fail(h->display, "tensor %R: checksum mismatch (stored xxh64 %s, data has %s): the file is corrupt",
                    h->entries[i].name, a, b);
            goto error;
        }
    }
    rc = 0;
error:
    Py_XDECREF(algo);
    Py_XDECREF(text);
    Py_XDECREF(sums);
    Py_XDECREF(value);
    PyMem_Free(expected);
    PyMem_Free(actual);
    return rc;
}

PyDoc_STRVAR(st_read_doc,
"st_read(path, *, verify=False, _verify_if_present=False) -> (metadata, tensors)\n--\n\n"
"Read a safetensors file: validate its header (CheckpointError \"<path>: <what>\" on any\n"
"defect), map it copy-on-write and return the `__metadata__` dict and a dict of CPU\n"
"tensors over the mapping (zero-copy; writes to them never reach the file), in\n"
"header order.  The mapping lives until the last tensor over it is freed.\n"
"verify=True also checks the XXH64 checksums the writer stored (CheckpointError\n"
"naming the tensor on a mismatch, or when the file has no checksums; with\n"
"_verify_if_present=True a file without checksums is read unchecked).\n"
"Every defect of the file raises modelopt_c.CheckpointError, a ValueError.");

static PyObject *
st_read(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"path", "verify", "_verify_if_present", NULL};
    PyObject *path = NULL, *fsbytes = NULL, *display = NULL, *metadata = NULL, *tensors = NULL;
    PyObject *torch = NULL, *from_dlpack = NULL, *result = NULL;
    int verify = 0, if_present = 0, fd = -1;
    StHeader h = {0};
    StMap *map = NULL;
    uint64_t n = 0, size = 0;
    (void)module;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$pp:st_read", kwlist, &path, &verify, &if_present) ||
        st_path_args(path, &fsbytes, &display) < 0) {
        goto error;
    }
    h.display = display;
    if ((metadata = PyDict_New()) == NULL || (tensors = PyDict_New()) == NULL) {
        goto error;
    }
    if ((torch = PyImport_ImportModule("torch")) == NULL ||
        (from_dlpack = PyObject_GetAttrString(torch, "from_dlpack")) == NULL) {
        goto error;
    }
    if (st_load_header(fsbytes, display, &h, metadata, &fd, &n, &size) < 0) {
        goto error;
    }
    map = malloc(sizeof(StMap));
    if (map == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    atomic_init(&map->refs, 1); /* ours, until this call ends */
    map->len = (size_t)size;
    map->addr = mmap(NULL, map->len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (map->addr == MAP_FAILED) {
        free(map);
        map = NULL;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, display);
        goto error;
    }
    close(fd);
    fd = -1;
    char *data = (char *)map->addr + 8 + n;
    if (verify && if_present) {
        int has = PyDict_GetItemString(metadata, "checksums") != NULL; /* metadata holds only str */
        verify = has;
    }
    if (verify && st_verify(&h, metadata, data) < 0) {
        goto error;
    }
    for (size_t i = 0; i < h.nentries; i++) {
        PyObject *t = st_make_tensor(map, &h, &h.entries[i], data, from_dlpack);
        if (t == NULL || PyDict_SetItem(tensors, h.entries[i].name, t) < 0) {
            Py_XDECREF(t);
            goto error;
        }
        Py_DECREF(t);
    }
    result = PyTuple_Pack(2, metadata, tensors);
error:
    if (fd >= 0) {
        close(fd);
    }
    if (map != NULL) {
        st_map_release(map);
    }
    st_header_clear(&h);
    Py_XDECREF(fsbytes);
    Py_XDECREF(display);
    Py_XDECREF(metadata);
    Py_XDECREF(tensors);
    Py_XDECREF(torch);
    Py_XDECREF(from_dlpack);
    return result;
}

PyDoc_STRVAR(st_read_header_doc,
"st_read_header(path) -> (metadata, tensors, data_start)\n--\n\n"
"Validate a safetensors file's header without mapping its data: the\n"
"`__metadata__` dict, a dict name -> (dtype, shape, begin, end) in header order\n"
"(offsets relative to the data section), and the data section's file offset.");

static PyObject *
st_read_header(PyObject *module, PyObject *path)
{
    PyObject *fsbytes = NULL, *display = NULL, *metadata = NULL, *tensors = NULL, *result = NULL;
    PyObject *shape = NULL, *info = NULL;
    StHeader h = {0};
    uint64_t n = 0, size = 0;
    (void)module;

    if (st_path_args(path, &fsbytes, &display) < 0) {
        goto error;
    }
    h.display = display;
    if ((metadata = PyDict_New()) == NULL || (tensors = PyDict_New()) == NULL ||
        st_load_header(fsbytes, display, &h, metadata, NULL, &n, &size) < 0) {
        goto error;
    }
    for (size_t i = 0; i < h.nentries; i++) {
        StEntry *e = &h.entries[i];
        shape = PyTuple_New(e->ndim);
        if (shape == NULL) {
            goto error;
        }
        for (int d = 0; d < e->ndim; d++) {
            PyObject *v = PyLong_FromLongLong(h.shapes[e->shape_at + (size_t)d]);
            if (v == NULL) {
                goto error;
            }
            PyTuple_SET_ITEM(shape, d, v);
        }
        info = Py_BuildValue("(sOKK)", st_dtypes[e->dtype].name, shape, (unsigned long long)e->begin,
                             (unsigned long long)e->end);
        if (info == NULL || PyDict_SetItem(tensors, e->name, info) < 0) {
            goto error;
        }
        Py_CLEAR(shape);
        Py_CLEAR(info);
    }
    result = Py_BuildValue("(OOK)", metadata, tensors, (unsigned long long)(8 + n));
error:
    st_header_clear(&h);
    Py_XDECREF(fsbytes);
    Py_XDECREF(display);
    Py_XDECREF(metadata);
    Py_XDECREF(tensors);
    Py_XDECREF(shape);
    Py_XDECREF(info);
    return result;
}

PyDoc_STRVAR(st_xxh64_doc,
"st_xxh64(data, /) -> int\n--\n\n"
"The XXH64 (seed 0) of a bytes-like object: the checksum the format stores.");

static PyObject *
st_xxh64(PyObject *module, PyObject *data)
{
    Py_buffer view;
    uint64_t v;
    (void)module;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    v = st_xxh64_buffer(view.buf, (size_t)view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(v);
}

PyMethodDef st_format_methods[] = {
    {"st_write", (PyCFunction)(void (*)(void))st_write, METH_VARARGS | METH_KEYWORDS, st_write_doc},
    {"st_read", (PyCFunction)(void (*)(void))st_read, METH_VARARGS | METH_KEYWORDS, st_read_doc},
    {"st_read_header", st_read_header, METH_O, st_read_header_doc},
    {"st_xxh64", st_xxh64, METH_O, st_xxh64_doc},
    {NULL, NULL, 0, NULL},
};
