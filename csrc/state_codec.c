/* The modelopt state <-> msgpack bytes codec: no pickle, types preserved, and a
 * decoder that treats its input as hostile (every length checked against the bytes
 * left before anything is allocated, nesting capped, trailing bytes rejected).
 *
 * Encoding goes through msgpack-c's packer, writing straight into the result
 * bytes.  Decoding is a single bounds-checked walk written here, not
 * msgpack_unpack(): msgpack-c's unpacker reserves a container's slots in its zone
 * before it reads them, so a 5-byte "array of 2^32 items" would cost gigabytes
 * before the truncation is noticed.  The walker checks every count against the
 * bytes left, reserves at most CODEC_PREALLOC slots per array whatever its header
 * claims (the list grows as items really decode, so memory stays proportional to
 * the input even when every nesting level claims all the bytes left), and builds
 * the Python objects directly (no zone to leak).  A failure inside a container
 * names its key path.
 *
 * Wire format: one msgpack object (https://github.com/msgpack/msgpack/blob/master/spec.md),
 * nothing after it.  Native msgpack types:
 *
 *   Python value          msgpack
 *   --------------------  ---------------------------------------------------------
 *   None                  nil
 *   bool                  false / true
 *   int                   smallest positive/negative fixint, uint 8-64 or int 8-64;
 *                         range -2**63 .. 2**64-1 (larger: OverflowError)
 *   float                 float 64 (the decoder also reads float 32)
 *   str                   str 8/16/32, strict UTF-8 (decoder: surrogates, overlong
 *                         forms and invalid bytes are errors)
 *   bytes, bytearray      bin 8/16/32 (decoded as bytes)
 *   list                  array
 *   dict                  map, insertion order; keys may be any encodable value
 *                         (the decoder rejects unhashable and duplicate keys)
 *
 * Extension types (msgpack ext; the type byte is the code below).  "ext32" means
 * this encoder always writes the 0xc9 form (4-byte big-endian length) for that
 * code; the decoder accepts any ext form (fixext 1/2/4/8/16, ext 8/16/32) as long
 * as the payload has the stated layout and is consumed exactly.
 *
 *   code  Python value    payload
 *   ----  --------------  ----------------------------------------------------------
 *     1   tuple           ext32; one msgpack array holding the items
 *     2   tensor (ref)    fixext 8; big-endian uint64 index into the `tensors`
 *                         sequence (encode_state(..., tensors=list) appends the tensor)
 *     3   tensor (inline) ext32; one msgpack array of 3:
 *                           [0] str: dtype name without "torch." ("bfloat16", ...)
 *                           [1] array of non-negative ints: the shape (0..64 dims, each
 *                               <= 2**63-1; written as the smallest uint form, read
 *                               from any int form)
 *                           [2] bin: the raw bytes of the contiguous CPU tensor in
 *                               C order, little-endian (the host order; big-endian
 *                               hosts are refused at build time);
 *                               length == prod(shape) * dtype.itemsize
 *                         a bool tensor's bytes must each be 0 or 1; quantized
 *                         dtypes (qint8, quint8, qint32, quint4x2, quint2x4) have
 *                         no inline form (scales are not stored; the x2/x4 ones
 *                         pack elements) and are refused both ways
 *     4   torch.Size      ext32; one msgpack array of ints
 *     5   torch.dtype     ext (fixext/ext8); the raw UTF-8 dtype name without
 *                         "torch." ("float32"), 1..64 bytes, not msgpack-framed
 *     6   torch.device    ext (fixext/ext8); the raw ASCII text of str(device)
 *                         ("cpu", "cuda:0"), 1..64 bytes, not msgpack-framed
 *     7   slice           ext32; one msgpack array of 3: [start, stop, step]
 *                         (each any encodable value, usually nil or int)
 *
 * Tensors, inline or by reference: plain torch.Tensor and nn.Parameter only, strided,
 * not meta, nested or quantized; anything else (DTensor/FSDP2 shards, other
 * subclasses, sparse...) is a TypeError naming the key path.  Lazy conj/neg bits
 * are resolved (by reference: the list gets the resolved tensor).  Every copy in
 * or out of a tensor is sized against its storage's real byte size.
 *
 * Codes 0 and 8..127 are unused; negative codes (msgpack's reserved range, e.g.
 * -1 timestamp) are rejected.  Subclasses of dict, list, tuple, str, int, float
 * and bytes are encoded as their base type (torch.Size is checked before tuple).
 * Nesting is capped at CODEC_MAX_DEPTH (256) levels of containers, counted the same
 * way both ways (a tuple, Size or slice is one level, like a list), so whatever
 * encodes also decodes. */
#include "module_state.h"

#include <msgpack.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>

/* Inline tensor bytes are little-endian, the host order of every platform torch ships for. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "state_codec.c writes tensor bytes in host order and assumes a little-endian host"
#endif

#define CODEC_MAX_DEPTH 256
#define CODEC_MAX_NDIM 64
#define CODEC_MAX_NAME 64
#define CODEC_PATH_SHOWN 20 /* path components shown at each end of a long key path */
#define CODEC_KEY_SHOWN 40  /* characters of a decoded key's repr shown in a key path */
#define CODEC_PREALLOC 16   /* array slots reserved before the items are read */
/* Short ASCII strings (keys above all: "_num_bits" thousands of times) are decoded
 * once per call and shared, through a small direct-mapped cache on the decoder. */
#define CODEC_STR_CACHE 512
#define CODEC_STR_CACHE_MAX_LEN 32

enum {
    EXT_TUPLE = 1,
    EXT_TENSOR_REF = 2,
    EXT_TENSOR = 3,
    EXT_SIZE = 4,
    EXT_DTYPE = 5,
    EXT_DEVICE = 6,
    EXT_SLICE = 7,
};

/* dtypes the codec knows, by canonical name (str(dtype) minus "torch."); names this
 * torch lacks are skipped at module exec. */
static const char *const codec_dtype_names[] = {
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "qint8", "quint8", "qint32", "quint4x2", "quint2x4", NULL,
};

/* Quantized dtypes: encodable as torch.dtype values, but a tensor of one has no
 * inline form (scales and zero points are not stored; quint4x2/quint2x4 also
 * pack several elements per byte, so numel * itemsize overstates the storage). */
static int
codec_dtype_is_quantized(const char *name)
{
    return name[0] == 'q'; /* qint8, quint8, qint32, quint4x2, quint2x4 */
}

static CodecState *
codec_state(PyObject *module)
{
    return &module_state(module)->codec;
}

/* ---- exceptions: take the raised one / raise it again (3.12 changed the API) ---- */

static PyObject *
exc_take(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL) {
        return NULL;
    }
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* Raise `exc` again (steals it). */
static void
exc_put(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

/* ---- big-endian loads and stores ---- */

static inline uint16_t
load_be16(const unsigned char *p)
{
    return (uint16_t)(((uint16_t)p[0] << 8) | p[1]);
}

static inline uint32_t
load_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t
load_be64(const unsigned char *p)
{
    return ((uint64_t)load_be32(p) << 32) | load_be32(p + 4);
}

static inline void
store_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* ---- argument parsing for METH_FASTCALL | METH_KEYWORDS ---- */

/* Match (args, nargs, kwnames) against `names`: the first `npos` may be positional,
 * the first `nreq` are required; out[i] gets a borrowed reference or stays NULL. */
static int
parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
           const char *const *names, Py_ssize_t nnames, Py_ssize_t npos, Py_ssize_t nreq,
           PyObject **out)
{
    if (nargs > npos) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd positional arguments (%zd given)",
                     fname, npos, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nnames; i++) {
        out[i] = i < nargs ? args[i] : NULL;
    }
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *kw = PyTuple_GET_ITEM(kwnames, k);
        Py_ssize_t i = 0;
        while (i < nnames && PyUnicode_CompareWithASCIIString(kw, names[i]) != 0) {
            i++;
        }
        if (i == nnames) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fname, kw);
            return -1;
        }
        if (out[i] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                         names[i]);
            return -1;
        }
        out[i] = args[nargs + k];
    }
    for (Py_ssize_t i = 0; i < nreq; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname, names[i]);
            return -1;
        }
    }
    return 0;
}

/* ======================================================================== */
/*                                 encoder                                  */
/* ======================================================================== */

/* The packer's output: a bytes object grown in place and trimmed at the end, so
 * the result needs no final copy (an inline tensor is copied exactly once). */
typedef struct {
    PyObject *bytes; /* owned; NULL until the first write */
    size_t size;     /* bytes written */
    size_t alloc;    /* capacity of `bytes` */
} OutBuf;

static int
outbuf_reserve(OutBuf *out, size_t extra)
{
    if (out->alloc - out->size >= extra) {
        return 0;
    }
    if (extra > (size_t)PY_SSIZE_T_MAX - out->size) {
        PyErr_NoMemory();
        return -1;
    }
    size_t want = out->size + extra;
    size_t grown = out->alloc < (size_t)PY_SSIZE_T_MAX / 2 ? out->alloc * 2 : (size_t)PY_SSIZE_T_MAX;
    want = want < grown ? grown : want;
    want = want < 256 ? 256 : want;
    if (out->bytes == NULL) {
        out->bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)want);
        if (out->bytes == NULL) {
            return -1;
        }
    }
    else if (_PyBytes_Resize(&out->bytes, (Py_ssize_t)want) < 0) {
        out->bytes = NULL; /* freed by _PyBytes_Resize */
        out->size = out->alloc = 0;
        return -1;
    }
    out->alloc = want;
    return 0;
}

/* msgpack_packer_write callback: 0 or -1 with a MemoryError set. */
static int
outbuf_write(void *data, const char *buf, size_t len)
{
    OutBuf *out = (OutBuf *)data;
    if (outbuf_reserve(out, len) < 0) {
        return -1;
    }
    memcpy(PyBytes_AS_STRING(out->bytes) + out->size, buf, len);
    out->size += len;
    return 0;
}

typedef struct {
    CodecState *cs;
    OutBuf buf;
    msgpack_packer pk;
    PyObject *tensors;  /* borrowed list, or NULL: tensors inline */

    /* Error path only.  A failure deep down either records its own message here
     * (err_type/err_msg, no Python exception set) or leaves a foreign exception,
     * which the first container on the way out stashes in `pending`.  Each
     * container then records where it was (path, innermost first), and
     * encode_state() raises once with the full key path. */
    PyObject *err_type; /* borrowed exception type */
    PyObject *err_msg;
    PyObject *pending;
    PyObject *path;     /* list of str components, innermost first */
    int in_key;         /* the failure is inside a dict key */
} Encoder;

static int
enc_fail(Encoder *enc, PyObject *type, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, va);
    va_end(va);
    if (msg != NULL) {
        enc->err_type = type;
        Py_XSETREF(enc->err_msg, msg);
    }
    return -1;
}

/* A packer call failed: the writer has set MemoryError already. */
static int
enc_nomem(void)
{
    if (!PyErr_Occurred()) {
        PyErr_NoMemory();
    }
    return -1;
}

/* Move a raised foreign exception into enc->pending, so the path can be recorded
 * with no exception set. */
static void
enc_stash(Encoder *enc)
{
    if (PyErr_Occurred()) {
        PyObject *exc = exc_take();
        if (enc->pending == NULL) {
            enc->pending = exc;
        }
        else {
            Py_XDECREF(exc);
        }
    }
}

/* Record one path component (steals `component`; NULL: formatting it failed). */
static int
enc_push(Encoder *enc, PyObject *component)
{
    if (component == NULL) {
        PyErr_Clear();
        return -1;
    }
    if (enc->path == NULL && (enc->path = PyList_New(0)) == NULL) {
        PyErr_Clear();
    }
    else if (PyList_Append(enc->path, component) < 0) {
        PyErr_Clear();
    }
    Py_DECREF(component);
    return -1;
}

/* On the way out of a failed item: record where it was.  All return -1. */
static int
enc_trace_index(Encoder *enc, Py_ssize_t i)
{
    enc_stash(enc);
    return enc_push(enc, PyUnicode_FromFormat("[%zd]", i));
}

static int
enc_trace_text(Encoder *enc, const char *text)
{
    enc_stash(enc);
    return enc_push(enc, PyUnicode_FromString(text));
}

static int
enc_trace_key(Encoder *enc, PyObject *key, int depth)
{
    PyObject *component = NULL;
    enc_stash(enc);
    if (depth == 0 && PyUnicode_CheckExact(key) && PyUnicode_IsIdentifier(key)) {
        component = Py_NewRef(key); /* the example style: modelopt_state_dict[1]... */
    }
    else if ((component = PyUnicode_FromFormat("[%R]", key)) == NULL) {
        PyErr_Clear();
        component = PyUnicode_FromString("[?]");
    }
    return enc_push(enc, component);
}

/* A dict key failed: what its own containers recorded is inside the key. */
static int
enc_trace_in_key(Encoder *enc)
{
    enc_stash(enc);
    if (enc->path != NULL && PyList_SetSlice(enc->path, 0, PyList_GET_SIZE(enc->path), NULL) < 0) {
        PyErr_Clear();
    }
    enc->in_key = 1;
    return -1;
}

/* A key path (list of str components, innermost first) as text, outermost
 * first ("the top level" when empty); long paths keep both ends. */
static PyObject *
render_path(PyObject *path)
{
    PyObject *parts = NULL, *sep = NULL, *result = NULL;
    Py_ssize_t n = path == NULL ? 0 : PyList_GET_SIZE(path);
    if (n == 0) {
        return PyUnicode_FromString("the top level");
    }
    if ((parts = PyList_New(0)) == NULL) {
        goto error;
    }
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        Py_ssize_t outer = n - 1 - i;
        if (n > 2 * CODEC_PATH_SHOWN && outer >= CODEC_PATH_SHOWN && i >= CODEC_PATH_SHOWN) {
            if (outer == CODEC_PATH_SHOWN) {
                PyObject *gap = PyUnicode_FromFormat("...(%zd more)...", n - 2 * CODEC_PATH_SHOWN);
                if (gap == NULL || PyList_Append(parts, gap) < 0) {
                    Py_XDECREF(gap);
                    goto error;
                }
                Py_DECREF(gap);
            }
            continue;
        }
        if (PyList_Append(parts, PyList_GET_ITEM(path, i)) < 0) {
            goto error;
        }
    }
    if ((sep = PyUnicode_FromString("")) == NULL) {
        goto error;
    }
    result = PyUnicode_Join(sep, parts);
error:
    Py_XDECREF(parts);
    Py_XDECREF(sep);
    return result;
}

/* Raise the recorded failure with its key path. */
static void
enc_raise(Encoder *enc)
{
    PyObject *path = NULL, *note = NULL, *res = NULL;
    enc_stash(enc); /* a failure at the top level */
    if ((path = render_path(enc->path)) == NULL) {
        PyErr_Clear();
        path = PyUnicode_FromString("?");
    }
    if (enc->err_type != NULL && enc->err_msg != NULL && path != NULL) {
        PyErr_Format(enc->err_type, "%U%s at %U", enc->err_msg, enc->in_key ? " in a dict key" : "",
                     path);
        goto done;
    }
    if (enc->pending != NULL) {
        if (path != NULL) {
            note = PyUnicode_FromFormat("while encoding the modelopt state%s at %U",
                                        enc->in_key ? " (a dict key)" : "", path);
        }
        if (note != NULL) {
            res = PyObject_CallMethod(enc->pending, "add_note", "O", note);
        }
        PyErr_Clear();
        exc_put(enc->pending);
        enc->pending = NULL;
        goto done;
    }
    if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_SystemError, "encode_state failed without an error");
    }
done:
    Py_XDECREF(path);
    Py_XDECREF(note);
    Py_XDECREF(res);
}

static int encode_obj(Encoder *enc, PyObject *obj, int depth);

/* Start an ext32 whose length is patched by ext32_close; *mark: payload start. */
static int
ext32_open(Encoder *enc, int code, size_t *mark)
{
    unsigned char hdr[6] = {0xc9, 0, 0, 0, 0, (unsigned char)code};
    if (outbuf_write(&enc->buf, (const char *)hdr, sizeof hdr) < 0) {
        return enc_nomem();
    }
    *mark = enc->buf.size;
    return 0;
}

static int
ext32_close(Encoder *enc, size_t mark)
{
    size_t len = enc->buf.size - mark;
    if (len > UINT32_MAX) {
        return enc_fail(enc, PyExc_OverflowError,
                        "cannot encode a value whose encoding exceeds 4 GiB (%zu bytes); pass a "
                        "tensors list to keep large tensors out of the state",
                        len);
    }
    store_be32((unsigned char *)PyBytes_AS_STRING(enc->buf.bytes) + mark - 5, (uint32_t)len);
    return 0;
}

static int
check_len32(Encoder *enc, size_t n, const char *what)
{
    if (n > UINT32_MAX) {
        return enc_fail(enc, PyExc_OverflowError,
                        "cannot encode a %s of length %zu (msgpack holds at most 2**32-1)", what, n);
    }
    return 0;
}

static int
encode_int(Encoder *enc, PyObject *obj)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow == 0) {
        if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        return msgpack_pack_int64(&enc->pk, (int64_t)v) < 0 ? enc_nomem() : 0;
    }
    if (overflow > 0) {
        unsigned long long u = PyLong_AsUnsignedLongLong(obj);
        if (!(u == (unsigned long long)-1 && PyErr_Occurred())) {
            return msgpack_pack_uint64(&enc->pk, (uint64_t)u) < 0 ? enc_nomem() : 0;
        }
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            return -1;
        }
        PyErr_Clear();
    }
    PyObject *bits = PyObject_CallMethod(obj, "bit_length", NULL);
    if (bits == NULL) {
        return -1;
    }
    enc_fail(enc, PyExc_OverflowError,
             "cannot encode int outside the 64-bit range -2**63 .. 2**64-1 (a %s int of %S bits)",
             overflow > 0 ? "positive" : "negative", bits);
    Py_DECREF(bits);
    return -1;
}

static int
encode_str(Encoder *enc, PyObject *obj)
{
    Py_ssize_t n = 0;
    const char *s = PyUnicode_AsUTF8AndSize(obj, &n);
    if (s == NULL || check_len32(enc, (size_t)n, "str") < 0) {
        return -1;
    }
    if (msgpack_pack_str(&enc->pk, (size_t)n) < 0 || msgpack_pack_str_body(&enc->pk, s, (size_t)n) < 0) {
        return enc_nomem();
    }
    return 0;
}

static int
encode_bytes(Encoder *enc, const char *data, Py_ssize_t n)
{
    if (check_len32(enc, (size_t)n, "bytes") < 0) {
        return -1;
    }
    if (msgpack_pack_bin(&enc->pk, (size_t)n) < 0 || msgpack_pack_bin_body(&enc->pk, data, (size_t)n) < 0) {
        return enc_nomem();
    }
    return 0;
}

static int
encode_list(Encoder *enc, PyObject *obj, int depth)
{
    Py_ssize_t n = PyList_GET_SIZE(obj);
    if (check_len32(enc, (size_t)n, "list") < 0) {
        return -1;
    }
    if (msgpack_pack_array(&enc->pk, (size_t)n) < 0) {
        return enc_nomem();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyList_GET_SIZE(obj) != n) {
            enc_fail(enc, PyExc_RuntimeError, "list changed size during encoding");
            return enc_trace_index(enc, i);
        }
        PyObject *item = Py_NewRef(PyList_GET_ITEM(obj, i));
        int rc = encode_obj(enc, item, depth + 1);
        Py_DECREF(item);
        if (rc < 0) {
            return enc_trace_index(enc, i);
        }
    }
    if (PyList_GET_SIZE(obj) != n) {
        return enc_fail(enc, PyExc_RuntimeError, "list changed size during encoding");
    }
    return 0;
}

/* The items of a tuple (or torch.Size) as one msgpack array. */
static int
encode_items(Encoder *enc, PyObject *tuple, int depth)
{
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    if (check_len32(enc, (size_t)n, "tuple") < 0) {
        return -1;
    }
    if (msgpack_pack_array(&enc->pk, (size_t)n) < 0) {
        return enc_nomem();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (encode_obj(enc, PyTuple_GET_ITEM(tuple, i), depth + 1) < 0) {
            return enc_trace_index(enc, i);
        }
    }
    return 0;
}

static int
encode_tuple_ext(Encoder *enc, PyObject *tuple, int code, int depth)
{
    size_t mark = 0;
    if (ext32_open(enc, code, &mark) < 0 || encode_items(enc, tuple, depth) < 0) {
        return -1;
    }
    return ext32_close(enc, mark);
}

static int
encode_dict(Encoder *enc, PyObject *obj, int depth)
{
    Py_ssize_t n = PyDict_GET_SIZE(obj), pos = 0, done = 0;
    PyObject *key = NULL, *value = NULL;
    if (check_len32(enc, (size_t)n, "dict") < 0) {
        return -1;
    }
    if (msgpack_pack_map(&enc->pk, (size_t)n) < 0) {
        return enc_nomem();
    }
    while (PyDict_Next(obj, &pos, &key, &value)) {
        int rc = 0;
        Py_INCREF(key);
        Py_INCREF(value);
        if (done == n || PyDict_GET_SIZE(obj) != n) {
            rc = enc_fail(enc, PyExc_RuntimeError, "dict changed size during encoding");
        }
        else if (encode_obj(enc, key, depth + 1) < 0) {
            rc = enc_trace_in_key(enc);
        }
        else if (encode_obj(enc, value, depth + 1) < 0) {
            rc = enc_trace_key(enc, key, depth);
        }
        Py_DECREF(key);
        Py_DECREF(value);
        if (rc < 0) {
            return -1;
        }
        done++;
    }
    if (done != n || PyDict_GET_SIZE(obj) != n) {
        return enc_fail(enc, PyExc_RuntimeError, "dict changed size during encoding");
    }
    return 0;
}

static int
encode_name_ext(Encoder *enc, int code, const char *s, Py_ssize_t n)
{
    if (msgpack_pack_ext(&enc->pk, (size_t)n, (int8_t)code) < 0 ||
        msgpack_pack_ext_body(&enc->pk, s, (size_t)n) < 0) {
        return enc_nomem();
    }
    return 0;
}

static int
encode_dtype(Encoder *enc, PyObject *obj)
{
    PyObject *name = NULL;
    int rc = PyDict_GetItemRef(enc->cs->name_by_dtype, obj, &name);
    if (rc == 0) {
        return enc_fail(enc, PyExc_TypeError, "cannot encode dtype %R (not known to the codec)", obj);
    }
    if (rc > 0) {
        rc = encode_name_ext(enc, EXT_DTYPE, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name));
    }
    Py_XDECREF(name);
    return rc;
}

static int
encode_device(Encoder *enc, PyObject *obj)
{
    PyObject *text = PyObject_Str(obj);
    Py_ssize_t n = 0;
    const char *s = NULL;
    int rc = -1;
    if (text == NULL || (s = PyUnicode_AsUTF8AndSize(text, &n)) == NULL) {
        goto error;
    }
    if (n < 1 || n > CODEC_MAX_NAME) {
        rc = enc_fail(enc, PyExc_ValueError, "cannot encode device %R (name longer than %d bytes)",
                      obj, CODEC_MAX_NAME);
        goto error;
    }
    rc = encode_name_ext(enc, EXT_DEVICE, s, n);
error:
    Py_XDECREF(text);
    return rc;
}

static int
encode_slice(Encoder *enc, PyObject *obj, int depth)
{
    static const char *const fields[3] = {".start", ".stop", ".step"};
    PySliceObject *sl = (PySliceObject *)obj;
    PyObject *parts[3] = {sl->start, sl->stop, sl->step};
    size_t mark = 0;
    if (ext32_open(enc, EXT_SLICE, &mark) < 0) {
        return -1;
    }
    if (msgpack_pack_array(&enc->pk, 3) < 0) {
        return enc_nomem();
    }
    for (int i = 0; i < 3; i++) {
        if (encode_obj(enc, parts[i], depth + 1) < 0) {
            return enc_trace_text(enc, fields[i]);
        }
    }
    return ext32_close(enc, mark);
}

static PyObject *
call_method0(PyObject *obj, PyObject *name)
{
    return PyObject_CallMethodNoArgs(obj, name);
}

/* Replace *t by t.<name>() (steals the old value even on failure). */
static int
chain_method(PyObject **t, PyObject *name)
{
    PyObject *next = call_method0(*t, name);
    Py_SETREF(*t, next);
    return next == NULL ? -1 : 0;
}

/* obj.<name> (attribute or, with `call`, method result) as a C truth value:
 * 0/1, or -1 with an exception set (including when torch answers a non-bool). */
static int
tensor_flag(PyObject *obj, PyObject *name, int call)
{
    PyObject *v = call ? call_method0(obj, name) : PyObject_GetAttr(obj, name);
    if (v == NULL) {
        return -1;
    }
    int rc = PyBool_Check(v) ? v == Py_True : -1;
    if (rc < 0) {
        PyErr_Format(PyExc_TypeError, "tensor.%U is a %s, not a bool", name, Py_TYPE(v)->tp_name);
    }
    Py_DECREF(v);
    return rc;
}

/* obj.<name>() as a C integer (checked to be an int). */
static int
tensor_int(PyObject *obj, PyObject *name, long long *out)
{
    PyObject *v = call_method0(obj, name);
    if (v == NULL) {
        return -1;
    }
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "tensor.%U() is a %s, not an int", name, Py_TYPE(v)->tp_name);
        Py_DECREF(v);
        return -1;
    }
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* The bytes of a CPU tensor `t` as its storage really holds them: *data is its
 * first element, *avail the bytes of the storage from there to the end.  Every
 * copy in or out of a tensor is sized against *avail, never against
 * numel * itemsize alone (sub-byte dtypes like quint4x2 have storage for fewer
 * bytes than that).  0, or -1 with an exception set. */
static int
tensor_span(CodecState *cs, PyObject *t, char **data, size_t *avail)
{
    PyObject *storage = NULL;
    long long sbytes = 0, sptr = 0, offset = 0, esize = 0, ptr = 0;
    int rc = -1;
    if ((storage = call_method0(t, cs->s_untyped_storage)) == NULL ||
        tensor_int(storage, cs->s_nbytes, &sbytes) < 0 || tensor_int(storage, cs->s_data_ptr, &sptr) < 0 ||
        tensor_int(t, cs->s_storage_offset, &offset) < 0 || tensor_int(t, cs->s_element_size, &esize) < 0 ||
        tensor_int(t, cs->s_data_ptr, &ptr) < 0) {
        goto error;
    }
    /* offset * esize <= sbytes, and data_ptr() must be where the storage says */
    if (sbytes < 0 || offset < 0 || esize <= 0 || offset > sbytes / esize ||
        (sbytes > 0 && (unsigned long long)ptr != (unsigned long long)sptr + (unsigned long long)(offset * esize))) {
        PyErr_Format(PyExc_SystemError,
                     "tensor storage is inconsistent (storage %lld bytes at 0x%llx, offset %lld elements "
                     "of %lld bytes, data at 0x%llx)",
                     sbytes, (unsigned long long)sptr, offset, esize, (unsigned long long)ptr);
        goto error;
    }
    *data = (char *)(uintptr_t)(unsigned long long)ptr;
    *avail = (size_t)(sbytes - offset * esize);
    rc = 0;
error:
    Py_XDECREF(storage);
    return rc;
}

/* Whether some class in type(obj)'s MRO is called `name`: spots DTensor (and the
 * FSDP2 shards, which are DTensors) without importing torch.distributed. */
static int
type_has_base_named(PyObject *obj, const char *name)
{
    PyObject *mro = Py_TYPE(obj)->tp_mro;
    if (mro == NULL || !PyTuple_Check(mro)) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(mro); i++) {
        PyObject *base = PyTuple_GET_ITEM(mro, i);
        if (PyType_Check(base) && strcmp(((PyTypeObject *)base)->tp_name, name) == 0) {
            return 1;
        }
    }
    return 0;
}

/* Refuse what has no plain byte image: tensor subclasses (their methods run
 * Python code and their data is not theirs: DTensor/FSDP2 shards hold one rank's
 * piece), meta, nested, sparse and quantized tensors.  Both for inline tensors
 * and for tensors handed back by reference.  0, or -1. */
static int
check_tensor_kind(Encoder *enc, PyObject *obj, const char *how)
{
    CodecState *cs = enc->cs;
    PyObject *layout = NULL, *dtype = NULL;
    int flag = 0, rc = -1;
    PyTypeObject *tp = Py_TYPE(obj);

    if (tp != (PyTypeObject *)cs->Tensor && tp != (PyTypeObject *)cs->Parameter) {
        if (type_has_base_named(obj, "NestedTensor")) {
            return enc_fail(enc, PyExc_TypeError,
                            "cannot encode a nested tensor: store t.unbind() (a list of tensors) "
                            "instead");
        }
        if (type_has_base_named(obj, "DTensor")) {
            return enc_fail(enc, PyExc_TypeError,
                            "cannot encode a DTensor (a sharded tensor, e.g. from FSDP2 or tensor "
                            "parallelism): gather it with full_tensor() first; sharded state is not "
                            "supported yet");
        }
        return enc_fail(enc, PyExc_TypeError,
                        "cannot encode a tensor of the subclass %s (only plain torch.Tensor and "
                        "nn.Parameter): convert it to a plain tensor first, e.g. "
                        "t.as_subclass(torch.Tensor) or the subclass's own unwrapping",
                        tp->tp_name);
    }
    if ((flag = tensor_flag(obj, cs->s_is_meta, 0)) != 0) {
        if (flag > 0) {
            enc_fail(enc, PyExc_TypeError,
                     "cannot encode a meta tensor (it has no data): materialise it first, e.g. "
                     "t.to_empty(device='cpu') and fill in its values");
        }
        goto error;
    }
    if ((flag = tensor_flag(obj, cs->s_is_nested, 0)) != 0) {
        if (flag > 0) {
            enc_fail(enc, PyExc_TypeError,
                     "cannot encode a nested tensor: store t.unbind() (a list of tensors) instead");
        }
        goto error;
    }
    if ((layout = PyObject_GetAttr(obj, cs->s_layout)) == NULL) {
        goto error;
    }
    if (layout != cs->strided) {
        enc_fail(enc, PyExc_TypeError,
                 "cannot encode a tensor with layout %R %s(only strided tensors; call .to_dense() first)",
                 layout, how);
        goto error;
    }
    if ((flag = tensor_flag(obj, cs->s_is_quantized, 0)) != 0) {
        if (flag > 0 && (dtype = PyObject_GetAttr(obj, cs->s_dtype)) != NULL) {
            enc_fail(enc, PyExc_TypeError,
                     "cannot encode a quantized tensor (dtype %R): its scales and zero points have "
                     "no encoding; store t.dequantize(), or t.int_repr() with the quantization "
                     "parameters as separate values",
                     dtype);
        }
        goto error;
    }
    rc = 0;
error:
    Py_XDECREF(layout);
    Py_XDECREF(dtype);
    return rc;
}

static int
encode_tensor(Encoder *enc, PyObject *obj)
{
    CodecState *cs = enc->cs;
    PyObject *t = NULL, *dtype = NULL, *name = NULL, *shape = NULL, *nbytes_obj = NULL;
    size_t mark = 0;
    int rc = -1;

    if (check_tensor_kind(enc, obj, enc->tensors != NULL ? "" : "inline ") < 0) {
        return -1;
    }
    if (enc->tensors != NULL) {
        /* by reference: the caller stores the tensor (through DLPack, which drops
         * the lazy conj/neg bits), so hand it over with those bits resolved */
        unsigned char index_be[8];
        uint64_t index = (uint64_t)PyList_GET_SIZE(enc->tensors);
        int conj = 0, neg = 0;
        for (int i = 0; i < 8; i++) {
            index_be[i] = (unsigned char)(index >> (56 - 8 * i));
        }
        t = Py_NewRef(obj);
        if ((conj = tensor_flag(t, cs->s_is_conj, 1)) < 0 || (conj && chain_method(&t, cs->s_resolve_conj) < 0) ||
            (neg = tensor_flag(t, cs->s_is_neg, 1)) < 0 || (neg && chain_method(&t, cs->s_resolve_neg) < 0)) {
            goto error;
        }
        if (PyList_Append(enc->tensors, t) < 0) {
            goto error;
        }
        rc = encode_name_ext(enc, EXT_TENSOR_REF, (const char *)index_be, 8);
        goto error;
    }

    /* detach -> host -> plain values (no lazy conj/neg bits) -> C order */
    t = Py_NewRef(obj);
    if (chain_method(&t, cs->s_detach) < 0 || chain_method(&t, cs->s_cpu) < 0 ||
        chain_method(&t, cs->s_resolve_conj) < 0 || chain_method(&t, cs->s_resolve_neg) < 0 ||
        chain_method(&t, cs->s_contiguous) < 0) {
        goto error;
    }
    if (Py_TYPE(t) != (PyTypeObject *)cs->Tensor) {
        /* a torch function mode may answer anything */
        enc_fail(enc, PyExc_TypeError, "tensor.detach().cpu().contiguous() gave a %s, not a torch.Tensor",
                 Py_TYPE(t)->tp_name);
        goto error;
    }
    if ((dtype = PyObject_GetAttr(t, cs->s_dtype)) == NULL) {
        goto error;
    }
    if ((rc = PyDict_GetItemRef(cs->name_by_dtype, dtype, &name)) <= 0) {
        if (rc == 0) {
            enc_fail(enc, PyExc_TypeError, "cannot encode a tensor of dtype %R (not known to the codec)",
                     dtype);
        }
        rc = -1;
        goto error;
    }
    rc = -1;
    if ((shape = PyObject_GetAttr(t, cs->s_shape)) == NULL ||
        (nbytes_obj = PyObject_GetAttr(t, cs->s_nbytes)) == NULL) {
        goto error;
    }
    if (!PyTuple_Check(shape) || !PyLong_Check(nbytes_obj)) {
        PyErr_Format(PyExc_TypeError, "tensor.shape/.nbytes are a %s and a %s, not a tuple and an int",
                     Py_TYPE(shape)->tp_name, Py_TYPE(nbytes_obj)->tp_name);
        goto error;
    }
    Py_ssize_t ndim = PyTuple_GET_SIZE(shape);
    if (ndim > CODEC_MAX_NDIM) {
        enc_fail(enc, PyExc_ValueError, "cannot encode a tensor of %zd dims (at most %d)", ndim,
                 CODEC_MAX_NDIM);
        goto error;
    }
    size_t nbytes = PyLong_AsSize_t(nbytes_obj);
    if (nbytes == (size_t)-1 && PyErr_Occurred()) {
        goto error;
    }
    if (check_len32(enc, nbytes, "tensor of bytes") < 0) {
        goto error;
    }
    char *data = NULL;
    size_t avail = 0;
    if (nbytes > 0) {
        if (tensor_span(cs, t, &data, &avail) < 0) {
            goto error;
        }
        if (nbytes > avail || data == NULL) {
            /* numel * itemsize is more than the storage holds: a packed dtype */
            enc_fail(enc, PyExc_TypeError,
                     "cannot encode a tensor of dtype %R inline: it claims %zu bytes but its storage "
                     "holds %zu (a packed sub-byte dtype?); convert it to a plain dtype first",
                     dtype, nbytes, avail);
            goto error;
        }
    }
    /* header + dtype + shape + bin header + data, in one growth */
    if (outbuf_reserve(&enc->buf, nbytes + 32 + (size_t)PyBytes_GET_SIZE(name) + 9 * (size_t)ndim) < 0 ||
        ext32_open(enc, EXT_TENSOR, &mark) < 0) {
        goto error;
    }
    if (msgpack_pack_array(&enc->pk, 3) < 0 ||
        msgpack_pack_str_with_body(&enc->pk, PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name)) < 0 ||
        msgpack_pack_array(&enc->pk, (size_t)ndim) < 0) {
        enc_nomem();
        goto error;
    }
    for (Py_ssize_t i = 0; i < ndim; i++) {
        long long dim = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
        if (dim == -1 && PyErr_Occurred()) {
            goto error;
        }
        if (dim < 0) {
            PyErr_SetString(PyExc_ValueError, "tensor has a negative dimension");
            goto error;
        }
        if (msgpack_pack_uint64(&enc->pk, (uint64_t)dim) < 0) {
            enc_nomem();
            goto error;
        }
    }
    if (msgpack_pack_bin(&enc->pk, nbytes) < 0 ||
        (nbytes > 0 && msgpack_pack_bin_body(&enc->pk, data, nbytes) < 0)) {
        enc_nomem();
        goto error;
    }
    rc = ext32_close(enc, mark);
error:
    Py_XDECREF(t);
    Py_XDECREF(dtype);
    Py_XDECREF(name);
    Py_XDECREF(shape);
    Py_XDECREF(nbytes_obj);
    return rc;
}

/* Everything but the exact builtin types of the fast path. */
static int
encode_other(Encoder *enc, PyObject *obj, int depth)
{
    CodecState *cs = enc->cs;
    if (PyObject_TypeCheck(obj, (PyTypeObject *)cs->Tensor)) {
        return encode_tensor(enc, obj);
    }
    if (PyObject_TypeCheck(obj, (PyTypeObject *)cs->Size)) {
        return encode_tuple_ext(enc, obj, EXT_SIZE, depth);
    }
    if (PyObject_TypeCheck(obj, (PyTypeObject *)cs->dtype_type)) {
        return encode_dtype(enc, obj);
    }
    if (PyObject_TypeCheck(obj, (PyTypeObject *)cs->device_type)) {
        return encode_device(enc, obj);
    }
    if (PySlice_Check(obj)) {
        return encode_slice(enc, obj, depth);
    }
    if (PyByteArray_Check(obj)) {
        return encode_bytes(enc, PyByteArray_AS_STRING(obj), PyByteArray_GET_SIZE(obj));
    }
    /* subclasses of the builtins: encoded as their base type */
    if (PyLong_Check(obj)) {
        return encode_int(enc, obj);
    }
    if (PyFloat_Check(obj)) {
        return msgpack_pack_double(&enc->pk, PyFloat_AS_DOUBLE(obj)) < 0 ? enc_nomem() : 0;
    }
    if (PyUnicode_Check(obj)) {
        return encode_str(enc, obj);
    }
    if (PyBytes_Check(obj)) {
        return encode_bytes(enc, PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj));
    }
    if (PyDict_Check(obj)) {
        return encode_dict(enc, obj, depth);
    }
    if (PyList_Check(obj)) {
        return encode_list(enc, obj, depth);
    }
    if (PyTuple_Check(obj)) {
        return encode_tuple_ext(enc, obj, EXT_TUPLE, depth);
    }
    return enc_fail(enc, PyExc_TypeError, "cannot encode object of type %s",
                    Py_TYPE(obj)->tp_name);
}

static int
encode_obj(Encoder *enc, PyObject *obj, int depth)
{
    if (depth > CODEC_MAX_DEPTH) {
        return enc_fail(enc, PyExc_ValueError,
                        "cannot encode: nesting deeper than %d levels (does a container contain "
                        "itself?)",
                        CODEC_MAX_DEPTH);
    }
    PyTypeObject *tp = Py_TYPE(obj);
    if (tp == &PyUnicode_Type) {
        return encode_str(enc, obj);
    }
    if (tp == &PyLong_Type) {
        return encode_int(enc, obj);
    }
    if (tp == &PyDict_Type) {
        return encode_dict(enc, obj, depth);
    }
    if (tp == &PyList_Type) {
        return encode_list(enc, obj, depth);
    }
    if (tp == &PyTuple_Type) {
        return encode_tuple_ext(enc, obj, EXT_TUPLE, depth);
    }
    if (tp == &PyFloat_Type) {
        return msgpack_pack_double(&enc->pk, PyFloat_AS_DOUBLE(obj)) < 0 ? enc_nomem() : 0;
    }
    if (obj == Py_None) {
        return msgpack_pack_nil(&enc->pk) < 0 ? enc_nomem() : 0;
    }
    if (obj == Py_True) {
        return msgpack_pack_true(&enc->pk) < 0 ? enc_nomem() : 0;
    }
    if (obj == Py_False) {
        return msgpack_pack_false(&enc->pk) < 0 ? enc_nomem() : 0;
    }
    if (tp == &PyBytes_Type) {
        return encode_bytes(enc, PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj));
    }
    return encode_other(enc, obj, depth);
}

PyDoc_STRVAR(encode_state_doc,
"encode_state($module, obj, /, tensors=None)\n"
"--\n"
"\n"
"Encode a modelopt state (or any value made of None, bool, int, float, str,\n"
"bytes, list, tuple, dict, torch.Tensor, torch.Size, torch.dtype, torch.device\n"
"and slice) as msgpack bytes.\n"
"\n"
"With ``tensors=None`` tensors are stored inline (dtype, shape, raw bytes).  With\n"
"a list, each tensor is appended to it and only its index is stored; pass the\n"
"same tensors, in order, to decode_state().\n"
"\n"
"Raises TypeError for a value of another type and OverflowError for an int\n"
"outside -2**63 .. 2**64-1; the message names the key path of the value.");

static PyObject *
codec_encode_state(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"obj", "tensors"};
    PyObject *argv[2] = {NULL, NULL};
    PyObject *result = NULL;
    Encoder enc = {.cs = codec_state(module)};
    msgpack_packer_init(&enc.pk, &enc.buf, outbuf_write);

    if (parse_args("encode_state", args, nargs, kwnames, names, 2, 2, 1, argv) < 0) {
        goto error;
    }
    if (argv[1] != NULL && argv[1] != Py_None) {
        if (!PyList_Check(argv[1])) {
            PyErr_Format(PyExc_TypeError, "encode_state() tensors must be a list or None, not %s",
                         Py_TYPE(argv[1])->tp_name);
            goto error;
        }
        enc.tensors = argv[1];
    }
    if (encode_obj(&enc, argv[0], 0) < 0) {
        enc_raise(&enc);
        goto error;
    }
    /* trim to the bytes written (every encoding has at least one) */
    if (_PyBytes_Resize(&enc.buf.bytes, (Py_ssize_t)enc.buf.size) < 0) {
        enc.buf.bytes = NULL;
        goto error;
    }
    result = enc.buf.bytes;
    enc.buf.bytes = NULL;
error:
    Py_XDECREF(enc.buf.bytes);
    Py_XDECREF(enc.err_msg);
    Py_XDECREF(enc.pending);
    Py_XDECREF(enc.path);
    return result;
}

/* ======================================================================== */
/*                                 decoder                                  */
/* ======================================================================== */

typedef struct {
    CodecState *cs;
    const unsigned char *base; /* first byte of the input (offsets count from here) */
    const unsigned char *p;    /* next byte to read */
    const unsigned char *end;  /* limit: end of the input, or of the ext payload being read */
    PyObject *tensors;         /* borrowed sequence, or NULL */
    PyObject *source;          /* borrowed str for messages, or NULL */
    PyObject *path;            /* error path only: list of str components, innermost first */
    PyObject *str_cache[CODEC_STR_CACHE]; /* owned ASCII strs, or NULL */
} Decoder;

static PyObject *
dec_failv(Decoder *d, const unsigned char *at, const char *fmt, va_list va)
{
    PyObject *what = PyUnicode_FromFormatV(fmt, va);
    if (what == NULL) {
        return NULL;
    }
    Py_ssize_t off = at - d->base;
    if (d->source != NULL) {
        PyErr_Format(d->cs->DecodeError, "cannot decode modelopt state from %R at byte offset %zd: %U",
                     d->source, off, what);
    }
    else {
        PyErr_Format(d->cs->DecodeError, "cannot decode modelopt state at byte offset %zd: %U", off,
                     what);
    }
    Py_DECREF(what);
    return NULL;
}

/* Raise StateDecodeError for the bytes at `at`; returns NULL. */
static PyObject *
dec_fail(Decoder *d, const unsigned char *at, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    dec_failv(d, at, fmt, va);
    va_end(va);
    return NULL;
}

static int
dec_fail_int(Decoder *d, const unsigned char *at, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    dec_failv(d, at, fmt, va);
    va_end(va);
    return -1;
}

/* Turn the pending exception (raised by torch on hostile values) into a
 * StateDecodeError: "<what>: <original message>", chained as its cause. */
static PyObject *
dec_fail_from(Decoder *d, const unsigned char *at, const char *what)
{
    PyObject *cause = exc_take();
    PyObject *text = cause == NULL ? NULL : PyObject_Str(cause);
    if (text == NULL) {
        PyErr_Clear();
        dec_fail(d, at, "%s", what);
    }
    else {
        dec_fail(d, at, "%s (%s: %U)", what, Py_TYPE(cause)->tp_name, text);
    }
    Py_XDECREF(text);
    if (cause != NULL) {
        PyObject *exc = exc_take();
        if (exc != NULL) {
            PyException_SetCause(exc, cause); /* steals cause */
            exc_put(exc);
        }
        else {
            Py_DECREF(cause);
        }
    }
    return NULL;
}

static inline Py_ssize_t
dec_left(const Decoder *d)
{
    return d->end - d->p;
}

/* Check that `n` more bytes are there for `what`, which starts at `at`. */
static inline int
dec_need(Decoder *d, const unsigned char *at, uint64_t n, const char *what)
{
    if ((uint64_t)dec_left(d) < n) {
        return dec_fail_int(d, at, "truncated input: %s needs %llu bytes, %zd left", what,
                            (unsigned long long)n, dec_left(d));
    }
    return 0;
}

/* Read an n-byte big-endian length or count (n = 1, 2 or 4). */
static int
dec_read_len(Decoder *d, const unsigned char *at, int n, const char *what, uint32_t *out)
{
    if (dec_need(d, at, (uint64_t)n, what) < 0) {
        return -1;
    }
    *out = n == 1 ? d->p[0] : n == 2 ? load_be16(d->p) : load_be32(d->p);
    d->p += n;
    return 0;
}

static PyObject *decode_obj(Decoder *d, int depth);

static PyObject *
decode_str(Decoder *d, const unsigned char *at, uint32_t n)
{
    if (dec_need(d, at, n, "str") < 0) {
        return NULL;
    }
    const unsigned char *s = d->p;
    if (n <= CODEC_STR_CACHE_MAX_LEN) {
        uint32_t hash = 2166136261u; /* FNV-1a */
        unsigned char high = 0;
        for (uint32_t i = 0; i < n; i++) {
            high |= s[i];
            hash = (hash ^ s[i]) * 16777619u;
        }
        if (high < 0x80) { /* ASCII: valid UTF-8 as is */
            PyObject **slot = &d->str_cache[hash % CODEC_STR_CACHE];
            PyObject *hit = *slot;
            if (hit != NULL && PyUnicode_GET_LENGTH(hit) == (Py_ssize_t)n &&
                memcmp(PyUnicode_DATA(hit), s, n) == 0) {
                d->p += n;
                return Py_NewRef(hit);
            }
            PyObject *str = PyUnicode_New((Py_ssize_t)n, 127);
            if (str == NULL) {
                return NULL;
            }
            memcpy(PyUnicode_DATA(str), s, n);
            Py_XSETREF(*slot, Py_NewRef(str));
            d->p += n;
            return str;
        }
    }
    PyObject *str = PyUnicode_DecodeUTF8((const char *)s, (Py_ssize_t)n, "strict");
    if (str == NULL) {
        Py_ssize_t bad = 0;
        PyObject *exc = exc_take();
        if (exc == NULL || !PyObject_TypeCheck(exc, (PyTypeObject *)PyExc_UnicodeDecodeError) ||
            PyUnicodeDecodeError_GetStart(exc, &bad) < 0) {
            PyErr_Clear();
            bad = 0;
        }
        Py_XDECREF(exc);
        return dec_fail(d, s + bad, "invalid UTF-8 in str of %u bytes starting at byte offset %zd",
                        (unsigned int)n, (Py_ssize_t)(s - d->base));
    }
    d->p += n;
    return str;
}

/* On the way out of a failed item: record where it was (only for our own
 * StateDecodeError; the exception stays set).  Steals `component`. */
static void
dec_push(Decoder *d, PyObject *component)
{
    if (component != NULL && d->path == NULL && (d->path = PyList_New(0)) == NULL) {
        PyErr_Clear();
    }
    if (component != NULL && d->path != NULL && PyList_Append(d->path, component) < 0) {
        PyErr_Clear();
    }
    Py_XDECREF(component);
}

static void
dec_trace_index(Decoder *d, Py_ssize_t i)
{
    if (!PyErr_ExceptionMatches(d->cs->DecodeError)) {
        return;
    }
    PyObject *exc = exc_take();
    PyObject *component = PyUnicode_FromFormat("[%zd]", i);
    if (component == NULL) {
        PyErr_Clear();
    }
    dec_push(d, component);
    exc_put(exc);
}

/* A map value failed: its key, as in the encoder's paths (a short repr; a
 * top-level identifier key bare). */
static void
dec_trace_key(Decoder *d, PyObject *key, int depth)
{
    if (!PyErr_ExceptionMatches(d->cs->DecodeError)) {
        return;
    }
    PyObject *exc = exc_take(), *component = NULL, *repr = NULL;
    if (depth == 0 && PyUnicode_CheckExact(key) && PyUnicode_GET_LENGTH(key) <= CODEC_KEY_SHOWN &&
        PyUnicode_IsIdentifier(key)) {
        component = Py_NewRef(key);
    }
    else if ((repr = PyObject_Repr(key)) != NULL && PyUnicode_Check(repr)) {
        Py_ssize_t len = PyUnicode_GET_LENGTH(repr);
        if (len > CODEC_KEY_SHOWN) {
            PyObject *head = PyUnicode_Substring(repr, 0, CODEC_KEY_SHOWN);
            component = head == NULL ? NULL : PyUnicode_FromFormat("[%U...]", head);
            Py_XDECREF(head);
        }
        else {
            component = PyUnicode_FromFormat("[%U]", repr);
        }
    }
    if (component == NULL) {
        PyErr_Clear();
        component = PyUnicode_FromString("[?]");
        PyErr_Clear();
    }
    Py_XDECREF(repr);
    dec_push(d, component);
    exc_put(exc);
}

/* The items of an array of `n` whose header is at `at`, as a list or a tuple.
 * The count is only a claim: at most CODEC_PREALLOC slots are reserved up front
 * and the list grows as items actually decode, so nested headers that each claim
 * "all the bytes left" cost no more than the items that are really there. */
static PyObject *
decode_array(Decoder *d, const unsigned char *at, uint32_t n, int depth, int as_tuple)
{
    PyObject *seq = NULL, *item = NULL, *result = NULL;
    /* every item needs at least one byte */
    if ((Py_ssize_t)n > dec_left(d)) {
        return dec_fail(d, at, "array header claims %u items but only %zd bytes are left",
                        (unsigned int)n, dec_left(d));
    }
    Py_ssize_t pre = n < CODEC_PREALLOC ? (Py_ssize_t)n : CODEC_PREALLOC;
    int direct_tuple = as_tuple && (Py_ssize_t)n == pre; /* small tuples: built in place */
    if ((seq = direct_tuple ? PyTuple_New(pre) : PyList_New(pre)) == NULL) {
        goto error;
    }
    for (uint32_t i = 0; i < n; i++) {
        if ((item = decode_obj(d, depth + 1)) == NULL) {
            dec_trace_index(d, (Py_ssize_t)i);
            goto error;
        }
        if (direct_tuple) {
            PyTuple_SET_ITEM(seq, i, item);
        }
        else if ((Py_ssize_t)i < pre) {
            PyList_SET_ITEM(seq, i, item);
        }
        else if (PyList_Append(seq, item) < 0) {
            goto error;
        }
        else {
            Py_DECREF(item);
        }
        item = NULL;
    }
    result = as_tuple && !direct_tuple ? PyList_AsTuple(seq) : Py_NewRef(seq);
error:
    Py_XDECREF(seq);
    Py_XDECREF(item);
    return result;
}

static PyObject *
decode_map(Decoder *d, const unsigned char *at, uint32_t n, int depth)
{
    PyObject *dict = NULL, *key = NULL, *value = NULL;
    /* every entry needs at least two bytes */
    if ((Py_ssize_t)n > dec_left(d) / 2) {
        return dec_fail(d, at, "map header claims %u entries but only %zd bytes are left",
                        (unsigned int)n, dec_left(d));
    }
    if ((dict = PyDict_New()) == NULL) {
        goto error;
    }
    for (uint32_t i = 0; i < n; i++) {
        const unsigned char *key_at = d->p;
        if ((key = decode_obj(d, depth + 1)) == NULL) {
            goto error;
        }
        if (PyObject_Hash(key) == -1) {
            PyErr_Clear();
            dec_fail(d, key_at, "map key of type %s is not hashable", Py_TYPE(key)->tp_name);
            goto error;
        }
        if ((value = decode_obj(d, depth + 1)) == NULL) {
            dec_trace_key(d, key, depth);
            goto error;
        }
        Py_ssize_t before = PyDict_GET_SIZE(dict);
        if (PyDict_SetItem(dict, key, value) < 0) {
            goto error;
        }
        if (PyDict_GET_SIZE(dict) == before) {
            dec_fail(d, key_at, "duplicate map key %R", key);
            goto error;
        }
        Py_CLEAR(key);
        Py_CLEAR(value);
    }
    return dict;
error:
    Py_XDECREF(dict);
    Py_XDECREF(key);
    Py_XDECREF(value);
    return NULL;
}

/* Read the header of an array that a payload layout requires. */
static int
dec_expect_array(Decoder *d, const char *what, uint32_t *n)
{
    const unsigned char *at = d->p;
    if (dec_need(d, at, 1, what) < 0) {
        return -1;
    }
    unsigned char b = *d->p++;
    if ((b & 0xf0) == 0x90) {
        *n = b & 0x0f;
    }
    else if (b == 0xdc || b == 0xdd) {
        if (dec_read_len(d, at, b == 0xdc ? 2 : 4, what, n) < 0) {
            return -1;
        }
    }
    else {
        return dec_fail_int(d, at, "%s must be a msgpack array (found type byte 0x%x)", what, b);
    }
    if ((Py_ssize_t)*n > dec_left(d)) {
        return dec_fail_int(d, at, "%s claims %u items but only %zd bytes are left", what,
                            (unsigned int)*n, dec_left(d));
    }
    return 0;
}

/* Read a non-negative integer that a payload layout requires. */
static int
dec_expect_uint(Decoder *d, const char *what, uint64_t *out)
{
    const unsigned char *at = d->p;
    if (dec_need(d, at, 1, what) < 0) {
        return -1;
    }
    unsigned char b = *d->p++;
    if (b <= 0x7f) {
        *out = b;
        return 0;
    }
    /* uint 8..64, or int 8..64 holding a non-negative value (legal, if not minimal) */
    int n = b == 0xcc || b == 0xd0 ? 1 : b == 0xcd || b == 0xd1 ? 2 : b == 0xce || b == 0xd2 ? 4
          : b == 0xcf || b == 0xd3 ? 8 : 0;
    if (n == 0) {
        return dec_fail_int(d, at, "%s must be a non-negative msgpack int (found type byte 0x%x)",
                            what, b);
    }
    if (dec_need(d, at, (uint64_t)n, what) < 0) {
        return -1;
    }
    uint64_t v = n == 1 ? d->p[0] : n == 2 ? load_be16(d->p) : n == 4 ? load_be32(d->p) : load_be64(d->p);
    if (b >= 0xd0 && (v >> (8 * n - 1)) != 0) {
        return dec_fail_int(d, at, "%s must not be negative", what);
    }
    *out = v;
    d->p += n;
    return 0;
}

/* Read a str or bin that a payload layout requires (borrowed bytes of the input). */
static int
dec_expect_raw(Decoder *d, int want_str, const char *what, const unsigned char **ptr, uint32_t *len)
{
    const unsigned char *at = d->p;
    if (dec_need(d, at, 1, what) < 0) {
        return -1;
    }
    unsigned char b = *d->p++;
    int n = 0;
    if (want_str && (b & 0xe0) == 0xa0) {
        *len = b & 0x1f;
    }
    else if ((n = want_str ? (b == 0xd9 ? 1 : b == 0xda ? 2 : b == 0xdb ? 4 : 0)
                           : (b == 0xc4 ? 1 : b == 0xc5 ? 2 : b == 0xc6 ? 4 : 0)) != 0) {
        if (dec_read_len(d, at, n, what, len) < 0) {
            return -1;
        }
    }
    else {
        return dec_fail_int(d, at, "%s must be a msgpack %s (found type byte 0x%x)", what,
                            want_str ? "str" : "bin", b);
    }
    if (dec_need(d, at, *len, what) < 0) {
        return -1;
    }
    *ptr = d->p;
    d->p += *len;
    return 0;
}

/* An ASCII name of 1..CODEC_MAX_NAME printable characters, as a str. */
static PyObject *
dec_name(Decoder *d, const unsigned char *at, const unsigned char *s, size_t n, const char *what)
{
    if (n < 1 || n > CODEC_MAX_NAME) {
        return dec_fail(d, at, "%s name of %zu bytes (must be 1..%d)", what, n, CODEC_MAX_NAME);
    }
    for (size_t i = 0; i < n; i++) {
        if (s[i] < 0x21 || s[i] > 0x7e) {
            return dec_fail(d, at, "%s name has a byte 0x%x that is not printable ASCII", what, s[i]);
        }
    }
    return PyUnicode_DecodeASCII((const char *)s, (Py_ssize_t)n, "strict");
}

/* (dtype, itemsize) for a dtype name, a new reference, or NULL with the error set. */
static PyObject *
dec_lookup_dtype(Decoder *d, const unsigned char *at, const unsigned char *s, size_t n)
{
    PyObject *name = NULL, *entry = NULL;
    if ((name = dec_name(d, at, s, n, "dtype")) == NULL) {
        return NULL;
    }
    int rc = PyDict_GetItemRef(d->cs->dtype_by_name, name, &entry);
    if (rc == 0) {
        dec_fail(d, at, "unknown dtype %R", name);
    }
    Py_DECREF(name);
    return entry;
}

static PyObject *
decode_tensor_ref(Decoder *d, const unsigned char *at, const unsigned char *payload, uint32_t len)
{
    PyObject *item = NULL;
    if (len != 8) {
        return dec_fail(d, at, "tensor reference payload must be 8 bytes, not %u", (unsigned int)len);
    }
    uint64_t index = load_be64(payload);
    if (d->tensors == NULL) {
        return dec_fail(d, at, "tensor reference #%llu but no tensors were given",
                        (unsigned long long)index);
    }
    Py_ssize_t count = PySequence_Size(d->tensors);
    if (count < 0) {
        return NULL;
    }
    if (index >= (uint64_t)count) {
        return dec_fail(d, at, "tensor reference #%llu is out of range (%zd tensors given)",
                        (unsigned long long)index, count);
    }
    if ((item = PySequence_GetItem(d->tensors, (Py_ssize_t)index)) == NULL) {
        return NULL;
    }
    if (!PyObject_TypeCheck(item, (PyTypeObject *)d->cs->Tensor)) {
        dec_fail(d, at, "tensor reference #%llu resolves to a %s, not a tensor",
                 (unsigned long long)index, Py_TYPE(item)->tp_name);
        Py_CLEAR(item);
    }
    return item;
}

static PyObject *
decode_tensor(Decoder *d, const unsigned char *at)
{
    CodecState *cs = d->cs;
    PyObject *entry = NULL, *shape = NULL, *t = NULL, *result = NULL;
    const unsigned char *name = NULL, *data = NULL;
    uint32_t nfields = 0, name_len = 0, ndim = 0, data_len = 0;
    int64_t dims[CODEC_MAX_NDIM];

    if (dec_expect_array(d, "tensor payload", &nfields) < 0) {
        goto error;
    }
    if (nfields != 3) {
        dec_fail(d, at, "tensor payload must be an array of 3 (dtype, shape, data), not %u",
                 (unsigned int)nfields);
        goto error;
    }
    const unsigned char *name_at = d->p;
    if (dec_expect_raw(d, 1, "tensor dtype", &name, &name_len) < 0 ||
        (entry = dec_lookup_dtype(d, name_at, name, name_len)) == NULL) {
        goto error;
    }
    if (PyTuple_GET_ITEM(entry, 2) != Py_True) {
        char text[CODEC_MAX_NAME + 1]; /* dec_lookup_dtype checked: 1..64 printable bytes */
        memcpy(text, name, name_len);
        text[name_len] = '\0';
        dec_fail(d, name_at,
                 "tensor dtype '%s' is quantized: quantized tensors have no inline form (their "
                 "scales and zero points are not stored)",
                 text);
        goto error;
    }
    const unsigned char *shape_at = d->p;
    if (dec_expect_array(d, "tensor shape", &ndim) < 0) {
        goto error;
    }
    if (ndim > CODEC_MAX_NDIM) {
        dec_fail(d, shape_at, "tensor shape has %u dims (at most %d)", (unsigned int)ndim,
                 CODEC_MAX_NDIM);
        goto error;
    }
    uint64_t numel = 1;
    int zero = 0;
    for (uint32_t i = 0; i < ndim; i++) {
        uint64_t dim = 0;
        if (dec_expect_uint(d, "tensor dimension", &dim) < 0) {
            goto error;
        }
        if (dim > (uint64_t)INT64_MAX) {
            dec_fail(d, shape_at, "tensor dimension %u is %llu (over 2**63-1)", (unsigned int)i,
                     (unsigned long long)dim);
            goto error;
        }
        dims[i] = (int64_t)dim;
        if (dim == 0) {
            zero = 1;
        }
        else if (numel > (uint64_t)INT64_MAX / dim) {
            dec_fail(d, shape_at, "tensor shape has more than 2**63-1 elements");
            goto error;
        }
        else {
            numel *= dim;
        }
    }
    if (zero) {
        numel = 0;
    }
    const unsigned char *data_at = d->p;
    if (dec_expect_raw(d, 0, "tensor data", &data, &data_len) < 0) {
        goto error;
    }
    size_t itemsize = PyLong_AsSize_t(PyTuple_GET_ITEM(entry, 1));
    if (itemsize == (size_t)-1 && PyErr_Occurred()) {
        goto error;
    }
    if (itemsize == 0 || numel > (uint64_t)UINT32_MAX / itemsize || numel * itemsize != data_len) {
        dec_fail(d, data_at, "tensor data has %u bytes, but %llu elements of %zu bytes need %llu",
                 (unsigned int)data_len, (unsigned long long)numel, itemsize,
                 (unsigned long long)(numel * itemsize));
        goto error;
    }
    if (name_len == 4 && memcmp(name, "bool", 4) == 0) {
        for (uint32_t i = 0; i < data_len; i++) {
            if (data[i] > 1) {
                dec_fail(d, data + i, "bool tensor has a byte 0x%x that is neither 0 nor 1", data[i]);
                goto error;
            }
        }
    }
    if ((shape = PyTuple_New((Py_ssize_t)ndim)) == NULL) {
        goto error;
    }
    for (uint32_t i = 0; i < ndim; i++) {
        PyObject *dim = PyLong_FromLongLong(dims[i]);
        if (dim == NULL) {
            goto error;
        }
        PyTuple_SET_ITEM(shape, i, dim);
    }
    PyObject *call_args[2] = {shape, PyTuple_GET_ITEM(entry, 0)};
    if ((t = PyObject_Vectorcall(cs->empty, call_args, 1, cs->kw_dtype)) == NULL) {
        dec_fail_from(d, at, "cannot create the tensor");
        goto error;
    }
    if (Py_TYPE(t) != (PyTypeObject *)cs->Tensor) { /* a torch function mode may answer anything */
        PyErr_Format(PyExc_TypeError, "torch.empty gave a %s, not a torch.Tensor", Py_TYPE(t)->tp_name);
        dec_fail_from(d, at, "cannot create the tensor");
        goto error;
    }
    if (data_len > 0) {
        char *dst = NULL;
        size_t avail = 0;
        if (tensor_span(cs, t, &dst, &avail) < 0) {
            dec_fail_from(d, at, "cannot create the tensor");
            goto error;
        }
        /* sized from the storage itself, not from numel * itemsize */
        if (dst == NULL || avail < data_len) {
            dec_fail(d, data_at, "tensor data has %u bytes, but torch.empty gave storage for %zu",
                     (unsigned int)data_len, avail);
            goto error;
        }
        memcpy(dst, data, data_len);
    }
    result = Py_NewRef(t);
error:
    Py_XDECREF(entry);
    Py_XDECREF(shape);
    Py_XDECREF(t);
    return result;
}

static PyObject *
decode_ext(Decoder *d, const unsigned char *at, uint32_t len, int depth)
{
    PyObject *result = NULL, *items = NULL, *name = NULL;
    const unsigned char *outer_end = d->end;
    if (dec_need(d, at, 1 + (uint64_t)len, "ext") < 0) {
        return NULL;
    }
    int code = (int)(int8_t)*d->p++;
    const unsigned char *payload = d->p, *payload_end = d->p + len;
    d->end = payload_end; /* nested reads cannot run past the payload */

    switch (code) {
    case EXT_TUPLE:
    case EXT_SIZE:
    case EXT_SLICE: {
        uint32_t n = 0;
        const char *what = code == EXT_TUPLE ? "tuple payload" : code == EXT_SIZE ? "torch.Size payload" : "slice payload";
        const unsigned char *arr_at = d->p;
        if (dec_expect_array(d, what, &n) < 0 ||
            (items = decode_array(d, arr_at, n, depth, 1)) == NULL) {
            goto error;
        }
        if (code == EXT_TUPLE) {
            result = Py_NewRef(items);
        }
        else if (code == EXT_SIZE) {
            for (uint32_t i = 0; i < n; i++) {
                if (!PyLong_CheckExact(PyTuple_GET_ITEM(items, i))) {
                    dec_fail(d, arr_at, "torch.Size item %u is a %s, not an int", (unsigned int)i,
                             Py_TYPE(PyTuple_GET_ITEM(items, i))->tp_name);
                    goto error;
                }
            }
            if ((result = PyObject_CallOneArg(d->cs->Size, items)) == NULL) {
                dec_fail_from(d, at, "invalid torch.Size");
                goto error;
            }
        }
        else {
            if (n != 3) {
                dec_fail(d, arr_at, "slice payload must be an array of 3 (start, stop, step), not %u",
                         (unsigned int)n);
                goto error;
            }
            result = PySlice_New(PyTuple_GET_ITEM(items, 0), PyTuple_GET_ITEM(items, 1),
                                 PyTuple_GET_ITEM(items, 2));
        }
        break;
    }
    case EXT_TENSOR_REF:
        d->p = payload_end;
        result = decode_tensor_ref(d, at, payload, len);
        break;
    case EXT_TENSOR:
        result = decode_tensor(d, at);
        break;
    case EXT_DTYPE:
        d->p = payload_end;
        if ((items = dec_lookup_dtype(d, at, payload, len)) != NULL) {
            result = Py_NewRef(PyTuple_GET_ITEM(items, 0));
        }
        break;
    case EXT_DEVICE:
        d->p = payload_end;
        if ((name = dec_name(d, at, payload, len, "device")) == NULL) {
            goto error;
        }
        if ((result = PyObject_CallOneArg(d->cs->device_type, name)) == NULL) {
            dec_fail_from(d, at, "invalid device");
        }
        break;
    default:
        dec_fail(d, at, "unknown ext type %d", code);
        goto error;
    }
    if (result != NULL && d->p != payload_end) {
        dec_fail(d, d->p, "%zd unexpected bytes at the end of an ext %d payload",
                 (Py_ssize_t)(payload_end - d->p), code);
        Py_CLEAR(result);
    }
error:
    d->end = outer_end;
    Py_XDECREF(items);
    Py_XDECREF(name);
    return result;
}

static PyObject *
decode_obj(Decoder *d, int depth)
{
    const unsigned char *at = d->p;
    uint32_t n = 0;
    if (depth > CODEC_MAX_DEPTH) {
        return dec_fail(d, at, "nesting deeper than %d levels", CODEC_MAX_DEPTH);
    }
    if (dec_need(d, at, 1, "a value") < 0) {
        return NULL;
    }
    unsigned char b = *d->p++;
    if (b <= 0x7f) {
        return PyLong_FromLong(b);
    }
    if (b >= 0xe0) {
        return PyLong_FromLong((long)(int8_t)b);
    }
    if (b <= 0x8f) {
        return decode_map(d, at, b & 0x0f, depth);
    }
    if (b <= 0x9f) {
        return decode_array(d, at, b & 0x0f, depth, 0);
    }
    if (b <= 0xbf) {
        return decode_str(d, at, b & 0x1f);
    }
    switch (b) {
    case 0xc0:
        Py_RETURN_NONE;
    case 0xc2:
        Py_RETURN_FALSE;
    case 0xc3:
        Py_RETURN_TRUE;
    case 0xc4:
    case 0xc5:
    case 0xc6: {
        if (dec_read_len(d, at, b == 0xc4 ? 1 : b == 0xc5 ? 2 : 4, "bin", &n) < 0 ||
            dec_need(d, at, n, "bin") < 0) {
            return NULL;
        }
        PyObject *bytes = PyBytes_FromStringAndSize((const char *)d->p, (Py_ssize_t)n);
        d->p += n;
        return bytes;
    }
    case 0xc7:
    case 0xc8:
    case 0xc9:
        if (dec_read_len(d, at, b == 0xc7 ? 1 : b == 0xc8 ? 2 : 4, "ext", &n) < 0) {
            return NULL;
        }
        return decode_ext(d, at, n, depth);
    case 0xd4:
    case 0xd5:
    case 0xd6:
    case 0xd7:
    case 0xd8:
        return decode_ext(d, at, 1u << (b - 0xd4), depth);
    case 0xca: {
        if (dec_need(d, at, 4, "float 32") < 0) {
            return NULL;
        }
        uint32_t bits = load_be32(d->p);
        float f;
        memcpy(&f, &bits, sizeof f);
        d->p += 4;
        return PyFloat_FromDouble((double)f);
    }
    case 0xcb: {
        if (dec_need(d, at, 8, "float 64") < 0) {
            return NULL;
        }
        uint64_t bits = load_be64(d->p);
        double f;
        memcpy(&f, &bits, sizeof f);
        d->p += 8;
        return PyFloat_FromDouble(f);
    }
    case 0xcc:
    case 0xcd:
    case 0xce:
    case 0xcf: {
        int size = 1 << (b - 0xcc);
        if (dec_need(d, at, (uint64_t)size, "uint") < 0) {
            return NULL;
        }
        uint64_t v = size == 1 ? d->p[0] : size == 2 ? load_be16(d->p) : size == 4 ? load_be32(d->p) : load_be64(d->p);
        d->p += size;
        return PyLong_FromUnsignedLongLong((unsigned long long)v);
    }
    case 0xd0:
    case 0xd1:
    case 0xd2:
    case 0xd3: {
        int size = 1 << (b - 0xd0);
        if (dec_need(d, at, (uint64_t)size, "int") < 0) {
            return NULL;
        }
        int64_t v = size == 1 ? (int8_t)d->p[0]
                  : size == 2 ? (int16_t)load_be16(d->p)
                  : size == 4 ? (int32_t)load_be32(d->p)
                              : (int64_t)load_be64(d->p);
        d->p += size;
        return PyLong_FromLongLong((long long)v);
    }
    case 0xd9:
    case 0xda:
    case 0xdb:
        if (dec_read_len(d, at, b == 0xd9 ? 1 : b == 0xda ? 2 : 4, "str", &n) < 0) {
            return NULL;
        }
        return decode_str(d, at, n);
    case 0xdc:
    case 0xdd:
        if (dec_read_len(d, at, b == 0xdc ? 2 : 4, "array", &n) < 0) {
            return NULL;
        }
        return decode_array(d, at, n, depth, 0);
    case 0xde:
    case 0xdf:
        if (dec_read_len(d, at, b == 0xde ? 2 : 4, "map", &n) < 0) {
            return NULL;
        }
        return decode_map(d, at, n, depth);
    default: /* 0xc1 */
        return dec_fail(d, at, "byte 0x%x is not a msgpack type", b);
    }
}

/* A StateDecodeError raised inside a container: append the key path of the
 * value that failed, " (at key path modelopt_state_dict[0][1]['metadata'])". */
static void
dec_add_path(Decoder *d)
{
    PyObject *exc = NULL, *text = NULL, *path = NULL, *msg = NULL, *args = NULL;
    if (d->path == NULL || PyList_GET_SIZE(d->path) == 0 || !PyErr_ExceptionMatches(d->cs->DecodeError)) {
        return;
    }
    exc = exc_take();
    if ((text = PyObject_Str(exc)) == NULL || (path = render_path(d->path)) == NULL ||
        (msg = PyUnicode_FromFormat("%U (at key path %U)", text, path)) == NULL ||
        (args = PyTuple_Pack(1, msg)) == NULL || PyObject_SetAttrString(exc, "args", args) < 0) {
        PyErr_Clear(); /* keep the message without the path */
    }
    exc_put(exc);
    Py_XDECREF(text);
    Py_XDECREF(path);
    Py_XDECREF(msg);
    Py_XDECREF(args);
}

PyDoc_STRVAR(decode_state_doc,
"decode_state($module, data, /, tensors=None, *, source=None)\n"
"--\n"
"\n"
"Decode bytes written by encode_state() (any bytes-like object: bytes,\n"
"bytearray, memoryview, mmap).  Tensor references resolve against ``tensors``,\n"
"a sequence of tensors in the order encode_state() appended them.\n"
"\n"
"The input is treated as untrusted: anything that is not one complete, valid\n"
"encoding raises StateDecodeError (a ValueError) saying what is wrong and at\n"
"which byte offset; ``source`` (e.g. a file name) is named in the message.");

static PyObject *
codec_decode_state(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"data", "tensors", "source"};
    PyObject *argv[3] = {NULL, NULL, NULL};
    PyObject *result = NULL, *source = NULL;
    Py_buffer view = {0};
    int have_view = 0;
    Decoder d = {.cs = codec_state(module)};

    /* "source" is keyword-only: at most two positionals */
    if (parse_args("decode_state", args, nargs, kwnames, names, 3, 2, 1, argv) < 0) {
        goto error;
    }
    if (argv[1] != NULL && argv[1] != Py_None) {
        if (!PySequence_Check(argv[1])) {
            PyErr_Format(PyExc_TypeError, "decode_state() tensors must be a sequence or None, not %s",
                         Py_TYPE(argv[1])->tp_name);
            goto error;
        }
        d.tensors = argv[1];
    }
    if (argv[2] != NULL && argv[2] != Py_None) {
        source = PyUnicode_Check(argv[2]) ? Py_NewRef(argv[2]) : PyOS_FSPath(argv[2]);
        if (source != NULL && !PyUnicode_Check(source)) {
            Py_SETREF(source, PyObject_Str(source));
        }
        if (source == NULL) {
            goto error;
        }
        d.source = source;
    }
    if (PyObject_GetBuffer(argv[0], &view, PyBUF_SIMPLE) < 0) {
        goto error;
    }
    have_view = 1;
    d.base = d.p = (const unsigned char *)view.buf;
    d.end = d.base + view.len;
    if ((result = decode_obj(&d, 0)) == NULL) {
        dec_add_path(&d);
        goto error;
    }
    if (d.p != d.end) {
        dec_fail(&d, d.p, "%zd trailing bytes after the encoded state", (Py_ssize_t)(d.end - d.p));
        Py_CLEAR(result);
    }
error:
    for (int i = 0; i < CODEC_STR_CACHE; i++) {
        Py_XDECREF(d.str_cache[i]);
    }
    Py_XDECREF(d.path);
    if (have_view) {
        PyBuffer_Release(&view);
    }
    Py_XDECREF(source);
    return result;
}

PyMethodDef codec_methods[] = {
    {"encode_state", (PyCFunction)(void (*)(void))codec_encode_state, METH_FASTCALL | METH_KEYWORDS,
     encode_state_doc},
    {"decode_state", (PyCFunction)(void (*)(void))codec_decode_state, METH_FASTCALL | METH_KEYWORDS,
     decode_state_doc},
    {NULL, NULL, 0, NULL},
};

/* ======================================================================== */
/*                              module state                                */
/* ======================================================================== */

static int
codec_build_dtype_tables(CodecState *cs, PyObject *torch)
{
    PyObject *dtype = NULL, *text = NULL, *itemsize = NULL, *entry = NULL, *bname = NULL;
    int rc = -1;
    for (const char *const *np = codec_dtype_names; *np != NULL; np++) {
        if ((dtype = PyObject_GetAttrString(torch, *np)) == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
                goto error;
            }
            PyErr_Clear();
            continue; /* not in this torch */
        }
        if (!PyObject_TypeCheck(dtype, (PyTypeObject *)cs->dtype_type)) {
            Py_CLEAR(dtype);
            continue;
        }
        if ((text = PyObject_Str(dtype)) == NULL) {
            goto error;
        }
        /* only canonical names: str(torch.<name>) == "torch.<name>" */
        PyObject *want = PyUnicode_FromFormat("torch.%s", *np);
        if (want == NULL) {
            goto error;
        }
        int same = PyUnicode_Compare(text, want) == 0;
        Py_DECREF(want);
        if (!same) {
            Py_CLEAR(dtype);
            Py_CLEAR(text);
            continue;
        }
        if ((itemsize = PyObject_GetAttrString(dtype, "itemsize")) == NULL ||
            (entry = PyTuple_Pack(3, dtype, itemsize,
                                  codec_dtype_is_quantized(*np) ? Py_False : Py_True)) == NULL ||
            (bname = PyBytes_FromString(*np)) == NULL ||
            PyDict_SetItemString(cs->dtype_by_name, *np, entry) < 0 ||
            PyDict_SetItem(cs->name_by_dtype, dtype, bname) < 0) {
            goto error;
        }
        Py_CLEAR(dtype);
        Py_CLEAR(text);
        Py_CLEAR(itemsize);
        Py_CLEAR(entry);
        Py_CLEAR(bname);
    }
    rc = 0;
error:
    Py_XDECREF(dtype);
    Py_XDECREF(text);
    Py_XDECREF(itemsize);
    Py_XDECREF(entry);
    Py_XDECREF(bname);
    return rc;
}

#define CODEC_INTERN(field, text)                                    \
    do {                                                             \
        if ((cs->field = PyUnicode_InternFromString(text)) == NULL) { \
            goto error;                                              \
        }                                                            \
    } while (0)

int
codec_state_init(PyObject *module, CodecState *cs)
{
    PyObject *torch = NULL, *nn = NULL;
    int rc = -1;

    cs->DecodeError = PyErr_NewExceptionWithDoc(
        "modelopt_c.StateDecodeError",
        "Bytes that are not a valid encoded modelopt state (truncated, corrupt or hostile).",
        PyExc_ValueError, NULL);
    if (cs->DecodeError == NULL ||
        PyModule_AddObjectRef(module, "StateDecodeError", cs->DecodeError) < 0) {
        goto error;
    }
    CODEC_INTERN(s_detach, "detach");
    CODEC_INTERN(s_cpu, "cpu");
    CODEC_INTERN(s_contiguous, "contiguous");
    CODEC_INTERN(s_resolve_conj, "resolve_conj");
    CODEC_INTERN(s_resolve_neg, "resolve_neg");
    CODEC_INTERN(s_layout, "layout");
    CODEC_INTERN(s_dtype, "dtype");
    CODEC_INTERN(s_shape, "shape");
    CODEC_INTERN(s_nbytes, "nbytes");
    CODEC_INTERN(s_data_ptr, "data_ptr");
    CODEC_INTERN(s_untyped_storage, "untyped_storage");
    CODEC_INTERN(s_storage_offset, "storage_offset");
    CODEC_INTERN(s_element_size, "element_size");
    CODEC_INTERN(s_is_meta, "is_meta");
    CODEC_INTERN(s_is_nested, "is_nested");
    CODEC_INTERN(s_is_quantized, "is_quantized");
    CODEC_INTERN(s_is_conj, "is_conj");
    CODEC_INTERN(s_is_neg, "is_neg");
    if ((cs->kw_dtype = PyTuple_Pack(1, cs->s_dtype)) == NULL) {
        goto error;
    }
    if ((torch = PyImport_ImportModule("torch")) == NULL ||
        (cs->Tensor = PyObject_GetAttrString(torch, "Tensor")) == NULL ||
        (cs->Size = PyObject_GetAttrString(torch, "Size")) == NULL ||
        (nn = PyObject_GetAttrString(torch, "nn")) == NULL ||
        (cs->Parameter = PyObject_GetAttrString(nn, "Parameter")) == NULL ||
        (cs->dtype_type = PyObject_GetAttrString(torch, "dtype")) == NULL ||
        (cs->device_type = PyObject_GetAttrString(torch, "device")) == NULL ||
        (cs->strided = PyObject_GetAttrString(torch, "strided")) == NULL ||
        (cs->empty = PyObject_GetAttrString(torch, "empty")) == NULL) {
        goto error;
    }
    if (!PyType_Check(cs->Tensor) || !PyType_Check(cs->Parameter) || !PyType_Check(cs->Size) ||
        !PyType_Check(cs->dtype_type) || !PyType_Check(cs->device_type)) {
        PyErr_SetString(PyExc_ImportError,
                        "modelopt_c: torch.Tensor/nn.Parameter/Size/dtype/device are not types");
        goto error;
    }
    if ((cs->dtype_by_name = PyDict_New()) == NULL || (cs->name_by_dtype = PyDict_New()) == NULL ||
        codec_build_dtype_tables(cs, torch) < 0) {
        goto error;
    }
    rc = 0;
error:
    Py_XDECREF(torch);
    Py_XDECREF(nn);
    return rc;
}

int
codec_state_traverse(CodecState *cs, visitproc visit, void *arg)
{
    Py_VISIT(cs->DecodeError);
    Py_VISIT(cs->Tensor);
    Py_VISIT(cs->Parameter);
    Py_VISIT(cs->Size);
    Py_VISIT(cs->dtype_type);
    Py_VISIT(cs->device_type);
    Py_VISIT(cs->strided);
    Py_VISIT(cs->empty);
    Py_VISIT(cs->dtype_by_name);
    Py_VISIT(cs->name_by_dtype);
    return 0;
}

void
codec_state_clear(CodecState *cs)
{
    Py_CLEAR(cs->DecodeError);
    Py_CLEAR(cs->Tensor);
    Py_CLEAR(cs->Parameter);
    Py_CLEAR(cs->Size);
    Py_CLEAR(cs->dtype_type);
    Py_CLEAR(cs->device_type);
    Py_CLEAR(cs->strided);
    Py_CLEAR(cs->empty);
    Py_CLEAR(cs->dtype_by_name);
    Py_CLEAR(cs->name_by_dtype);
    Py_CLEAR(cs->s_detach);
    Py_CLEAR(cs->s_cpu);
    Py_CLEAR(cs->s_contiguous);
    Py_CLEAR(cs->s_resolve_conj);
    Py_CLEAR(cs->s_resolve_neg);
    Py_CLEAR(cs->s_layout);
    Py_CLEAR(cs->s_dtype);
    Py_CLEAR(cs->s_shape);
    Py_CLEAR(cs->s_nbytes);
    Py_CLEAR(cs->s_data_ptr);
    Py_CLEAR(cs->s_untyped_storage);
    Py_CLEAR(cs->s_storage_offset);
    Py_CLEAR(cs->s_element_size);
    Py_CLEAR(cs->s_is_meta);
    Py_CLEAR(cs->s_is_nested);
    Py_CLEAR(cs->s_is_quantized);
    Py_CLEAR(cs->s_is_conj);
    Py_CLEAR(cs->s_is_neg);
    Py_CLEAR(cs->kw_dtype);
}
