/* The codec's decoder: a single bounds-checked walk over bytes it does not trust
 * (msgspec's way, not msgpack_unpack(): msgpack-c's unpacker reserves a container's
 * slots in its zone before it reads them, so a 5-byte "array of 2^32 items" would
 * cost gigabytes before the truncation is noticed).  Every count is checked
 * against the bytes left, at most CODEC_PREALLOC slots are reserved per array
 * whatever its header claims (the list grows as items really decode, so memory
 * stays proportional to the input even when every nesting level claims all the
 * bytes left), nesting is capped, strings are strict UTF-8, trailing bytes are
 * rejected, and the Python objects are built directly (no zone to leak).  A
 * failure inside a container names its key path. */
#include "codec_decode.h"

#include "codec_path.h"
#include "codec_tensor.h"
#include "codec_wire.h"
#include "errors.h"

#include <stdarg.h>
#include <string.h>

#define CODEC_KEY_SHOWN 40  /* characters of a decoded key's repr shown in a key path */
#define CODEC_PREALLOC 16   /* array slots reserved before the items are read */
/* Short ASCII strings (keys above all: "_num_bits" thousands of times) are decoded
 * once per call and shared, through a small direct-mapped cache on the decoder. */
#define CODEC_STR_CACHE 512
#define CODEC_STR_CACHE_MAX_LEN 32

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

/* ---- failures ---- */

static PyObject *
dec_failv(Decoder *d, const unsigned char *at, const char *fmt, va_list va)
{
    PyObject *cause = PyErr_GetRaisedException(); /* usually none */
    PyObject *what = PyUnicode_FromFormatV(fmt, va), *msg = NULL;
    Py_ssize_t off = at - d->base;
    if (what != NULL && d->source != NULL) {
        msg = PyUnicode_FromFormat("cannot decode modelopt state from %R at byte offset %zd: %U",
                                   d->source, off, what);
    }
    else if (what != NULL) {
        msg = PyUnicode_FromFormat("cannot decode modelopt state at byte offset %zd: %U", off, what);
    }
    if (msg == NULL) {
        Py_XDECREF(cause); /* the MemoryError stands */
    }
    else {
        PyErr_SetRaisedException(cause);
        err_chain(d->cs->DecodeError, "%U", msg);
    }
    Py_XDECREF(what);
    Py_XDECREF(msg);
    return NULL;
}

/* Raise StateDecodeError for the bytes at `at`; an exception being raised (a
 * checked TypeError, UnicodeDecodeError, torch's error) becomes its __cause__.
 * Returns NULL. */
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

/* torch refused hostile values: StateDecodeError "<what> (<type>: <its message>)",
 * with torch's exception as __cause__.  Returns NULL. */
static PyObject *
dec_fail_from(Decoder *d, const unsigned char *at, const char *what)
{
    PyObject *cause = PyErr_GetRaisedException();
    PyObject *text = cause == NULL ? NULL : PyObject_Str(cause);
    const char *type = cause == NULL ? "" : Py_TYPE(cause)->tp_name;
    if (cause != NULL && text == NULL) {
        PyErr_Clear(); /* str() of torch's exception raised: say `what` alone */
    }
    PyErr_SetRaisedException(cause);
    if (text == NULL) {
        dec_fail(d, at, "%s", what);
    }
    else {
        dec_fail(d, at, "%s (%s: %U)", what, type, text);
    }
    Py_XDECREF(text);
    return NULL;
}

/* On the way out of a failed item: record where it was (only for our own
 * StateDecodeError, which stays raised). */
static void
dec_trace_index(Decoder *d, Py_ssize_t i)
{
    if (PyErr_ExceptionMatches(d->cs->DecodeError)) {
        PyObject *exc = PyErr_GetRaisedException();
        codec_path_push_index(&d->path, i);
        PyErr_SetRaisedException(exc);
    }
}

/* A map value failed: its key, as in the encoder's paths (a short repr; a
 * top-level identifier key bare). */
static void
dec_trace_key(Decoder *d, PyObject *key, int depth)
{
    if (PyErr_ExceptionMatches(d->cs->DecodeError)) {
        PyObject *exc = PyErr_GetRaisedException();
        codec_path_push_key(&d->path, key, depth, CODEC_KEY_SHOWN);
        PyErr_SetRaisedException(exc);
    }
}

/* A StateDecodeError raised inside a container: append the key path of the value
 * that failed, " (at key path modelopt_state_dict[0][1]['metadata'])".  The path is
 * part of the message (SPEC and the corpus expect it there), so this is the one
 * place that rewrites an exception's args instead of adding a note. */
static void
dec_add_path(Decoder *d)
{
    PyObject *exc = NULL, *text = NULL, *path = NULL, *msg = NULL, *args = NULL;
    if (d->path == NULL || PyList_GET_SIZE(d->path) == 0 || !PyErr_ExceptionMatches(d->cs->DecodeError)) {
        return;
    }
    exc = PyErr_GetRaisedException();
    if ((path = codec_path_render(d->path)) == NULL) {
        goto done; /* keep the message without the path */
    }
    if ((text = PyObject_Str(exc)) == NULL ||
        (msg = PyUnicode_FromFormat("%U (at key path %U)", text, path)) == NULL ||
        (args = PyTuple_Pack(1, msg)) == NULL || PyObject_SetAttrString(exc, "args", args) < 0) {
        PyErr_Clear(); /* no memory for the longer message: keep it without the path */
    }
done:
    PyErr_SetRaisedException(exc);
    Py_XDECREF(text);
    Py_XDECREF(path);
    Py_XDECREF(msg);
    Py_XDECREF(args);
}

/* ---- bounds ---- */

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
    *out = (uint32_t)load_be(d->p, n);
    d->p += n;
    return 0;
}

/* ---- scalars ---- */

static PyObject *decode_obj(Decoder *d, int depth);

/* Invalid UTF-8: StateDecodeError at the first bad byte, the codec's
 * UnicodeDecodeError as its __cause__. */
static PyObject *
dec_fail_utf8(Decoder *d, const unsigned char *s, uint32_t n)
{
    Py_ssize_t bad = 0;
    if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        return NULL; /* e.g. no memory: not the input's fault */
    }
    PyObject *exc = PyErr_GetRaisedException();
    if (PyUnicodeDecodeError_GetStart(exc, &bad) < 0) {
        Py_DECREF(exc);
        return NULL;
    }
    PyErr_SetRaisedException(exc);
    return dec_fail(d, s + bad, "invalid UTF-8 in str of %u bytes starting at byte offset %zd",
                    (unsigned int)n, (Py_ssize_t)(s - d->base));
}

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
        return dec_fail_utf8(d, s, n);
    }
    d->p += n;
    return str;
}

static PyObject *
decode_bin(Decoder *d, const unsigned char *at, uint32_t n)
{
    if (dec_need(d, at, n, "bin") < 0) {
        return NULL;
    }
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)d->p, (Py_ssize_t)n);
    d->p += n;
    return bytes;
}

/* float 32 (0xca) or float 64 (0xcb). */
static PyObject *
decode_float(Decoder *d, const unsigned char *at, unsigned char b)
{
    if (b == 0xca) {
        if (dec_need(d, at, 4, "float 32") < 0) {
            return NULL;
        }
        uint32_t bits = load_be32(d->p);
        float f;
        memcpy(&f, &bits, sizeof f);
        d->p += 4;
        return PyFloat_FromDouble((double)f);
    }
    if (dec_need(d, at, 8, "float 64") < 0) {
        return NULL;
    }
    uint64_t bits = load_be64(d->p);
    double f;
    memcpy(&f, &bits, sizeof f);
    d->p += 8;
    return PyFloat_FromDouble(f);
}

/* uint 8..64 (0xcc..0xcf) or int 8..64 (0xd0..0xd3). */
static PyObject *
decode_int(Decoder *d, const unsigned char *at, unsigned char b)
{
    int is_signed = b >= 0xd0;
    int size = 1 << (b - (is_signed ? 0xd0 : 0xcc));
    if (dec_need(d, at, (uint64_t)size, is_signed ? "int" : "uint") < 0) {
        return NULL;
    }
    uint64_t v = load_be(d->p, size);
    d->p += size;
    if (!is_signed) {
        return PyLong_FromUnsignedLongLong((unsigned long long)v);
    }
    int64_t s = size == 1 ? (int8_t)v : size == 2 ? (int16_t)v : size == 4 ? (int32_t)v : (int64_t)v;
    return PyLong_FromLongLong((long long)s);
}

/* ---- containers ---- */

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
        goto done;
    }
    for (uint32_t i = 0; i < n; i++) {
        if ((item = decode_obj(d, depth + 1)) == NULL) {
            dec_trace_index(d, (Py_ssize_t)i);
            goto done;
        }
        if (direct_tuple) {
            PyTuple_SET_ITEM(seq, i, item);
        }
        else if ((Py_ssize_t)i < pre) {
            PyList_SET_ITEM(seq, i, item);
        }
        else if (PyList_Append(seq, item) < 0) {
            goto done;
        }
        else {
            Py_DECREF(item);
        }
        item = NULL;
    }
    result = as_tuple && !direct_tuple ? PyList_AsTuple(seq) : Py_NewRef(seq);
done:
    Py_XDECREF(seq);
    Py_XDECREF(item);
    return result;
}

/* A decoded map key, checked to be hashable: 0, or -1 with StateDecodeError
 * (the TypeError as its __cause__) or another error set. */
static int
dec_check_key(Decoder *d, const unsigned char *key_at, PyObject *key)
{
    if (PyObject_Hash(key) != -1) {
        return 0;
    }
    if (PyErr_ExceptionMatches(PyExc_TypeError)) {
        dec_fail(d, key_at, "map key of type %s is not hashable", Py_TYPE(key)->tp_name);
    }
    return -1;
}

static PyObject *
decode_map(Decoder *d, const unsigned char *at, uint32_t n, int depth)
{
    PyObject *dict = NULL, *key = NULL, *value = NULL, *result = NULL;
    /* every entry needs at least two bytes */
    if ((Py_ssize_t)n > dec_left(d) / 2) {
        return dec_fail(d, at, "map header claims %u entries but only %zd bytes are left",
                        (unsigned int)n, dec_left(d));
    }
    if ((dict = PyDict_New()) == NULL) {
        goto done;
    }
    for (uint32_t i = 0; i < n; i++) {
        const unsigned char *key_at = d->p;
        if ((key = decode_obj(d, depth + 1)) == NULL || dec_check_key(d, key_at, key) < 0) {
            goto done;
        }
        if ((value = decode_obj(d, depth + 1)) == NULL) {
            dec_trace_key(d, key, depth);
            goto done;
        }
        Py_ssize_t before = PyDict_GET_SIZE(dict);
        if (PyDict_SetItem(dict, key, value) < 0) {
            goto done;
        }
        if (PyDict_GET_SIZE(dict) == before) {
            dec_fail(d, key_at, "duplicate map key %R", key);
            goto done;
        }
        Py_CLEAR(key);
        Py_CLEAR(value);
    }
    result = Py_NewRef(dict);
done:
    Py_XDECREF(dict);
    Py_XDECREF(key);
    Py_XDECREF(value);
    return result;
}

/* ---- the pieces an ext payload layout requires ---- */

/* The type byte of a value that a payload layout requires. */
static int
dec_type_byte(Decoder *d, const char *what, unsigned char *b)
{
    if (dec_need(d, d->p, 1, what) < 0) {
        return -1;
    }
    *b = *d->p++;
    return 0;
}

/* Read the header of an array that a payload layout requires. */
static int
dec_expect_array(Decoder *d, const char *what, uint32_t *n)
{
    const unsigned char *at = d->p;
    unsigned char b = 0;
    if (dec_type_byte(d, what, &b) < 0) {
        return -1;
    }
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
    unsigned char b = 0;
    if (dec_type_byte(d, what, &b) < 0) {
        return -1;
    }
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
    uint64_t v = load_be(d->p, n);
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
    unsigned char b = 0;
    if (dec_type_byte(d, what, &b) < 0) {
        return -1;
    }
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

/* (dtype, itemsize, inline_ok) for a dtype name, a new reference, or NULL with the
 * error set. */
static PyObject *
dec_lookup_dtype(Decoder *d, const unsigned char *at, const unsigned char *s, size_t n)
{
    PyObject *name = NULL, *entry = NULL;
    if ((name = dec_name(d, at, s, n, "dtype")) == NULL) {
        return NULL;
    }
    if (PyDict_GetItemRef(d->cs->dtype_by_name, name, &entry) == 0) {
        dec_fail(d, at, "unknown dtype %R", name);
    }
    Py_DECREF(name);
    return entry;
}

/* ---- tensors ---- */

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

/* An inline tensor payload as read: pointers into the input, checked. */
typedef struct {
    PyObject *entry; /* owned (dtype, itemsize, inline_ok) */
    const unsigned char *name_at, *name;
    uint32_t name_len;
    uint32_t ndim;
    int64_t dims[CODEC_MAX_NDIM];
    uint64_t numel;
    const unsigned char *data_at, *data;
    uint32_t data_len;
} TensorPayload;

/* [0]: the array of 3 around the payload, then the dtype, which must have an
 * inline form. */
static int
dec_tensor_dtype(Decoder *d, const unsigned char *at, TensorPayload *tp)
{
    uint32_t nfields = 0;
    if (dec_expect_array(d, "tensor payload", &nfields) < 0) {
        return -1;
    }
    if (nfields != 3) {
        return dec_fail_int(d, at, "tensor payload must be an array of 3 (dtype, shape, data), not %u",
                            (unsigned int)nfields);
    }
    tp->name_at = d->p;
    if (dec_expect_raw(d, 1, "tensor dtype", &tp->name, &tp->name_len) < 0 ||
        (tp->entry = dec_lookup_dtype(d, tp->name_at, tp->name, tp->name_len)) == NULL) {
        return -1;
    }
    if (PyTuple_GET_ITEM(tp->entry, 2) != Py_True) {
        char text[CODEC_MAX_NAME + 1]; /* dec_lookup_dtype checked: 1..64 printable bytes */
        memcpy(text, tp->name, tp->name_len);
        text[tp->name_len] = '\0';
        return dec_fail_int(d, tp->name_at,
                            "tensor dtype '%s' is quantized: quantized tensors have no inline form "
                            "(their scales and zero points are not stored)",
                            text);
    }
    return 0;
}

/* [1]: the shape, each dimension <= 2**63-1 and their product too. */
static int
dec_tensor_shape(Decoder *d, TensorPayload *tp)
{
    const unsigned char *shape_at = d->p;
    int zero = 0;
    if (dec_expect_array(d, "tensor shape", &tp->ndim) < 0) {
        return -1;
    }
    if (tp->ndim > CODEC_MAX_NDIM) {
        return dec_fail_int(d, shape_at, "tensor shape has %u dims (at most %d)", (unsigned int)tp->ndim,
                            CODEC_MAX_NDIM);
    }
    tp->numel = 1;
    for (uint32_t i = 0; i < tp->ndim; i++) {
        uint64_t dim = 0;
        if (dec_expect_uint(d, "tensor dimension", &dim) < 0) {
            return -1;
        }
        if (dim > (uint64_t)INT64_MAX) {
            return dec_fail_int(d, shape_at, "tensor dimension %u is %llu (over 2**63-1)", (unsigned int)i,
                                (unsigned long long)dim);
        }
        tp->dims[i] = (int64_t)dim;
        if (dim == 0) {
            zero = 1;
        }
        else if (tp->numel > (uint64_t)INT64_MAX / dim) {
            return dec_fail_int(d, shape_at, "tensor shape has more than 2**63-1 elements");
        }
        else {
            tp->numel *= dim;
        }
    }
    if (zero) {
        tp->numel = 0;
    }
    return 0;
}

/* [2]: the data, exactly numel * itemsize bytes (a bool tensor's each 0 or 1). */
static int
dec_tensor_data(Decoder *d, TensorPayload *tp)
{
    tp->data_at = d->p;
    if (dec_expect_raw(d, 0, "tensor data", &tp->data, &tp->data_len) < 0) {
        return -1;
    }
    size_t itemsize = PyLong_AsSize_t(PyTuple_GET_ITEM(tp->entry, 1));
    if (itemsize == (size_t)-1 && PyErr_Occurred()) {
        return -1;
    }
    if (itemsize == 0 || tp->numel > (uint64_t)UINT32_MAX / itemsize || tp->numel * itemsize != tp->data_len) {
        return dec_fail_int(d, tp->data_at, "tensor data has %u bytes, but %llu elements of %zu bytes need %llu",
                            (unsigned int)tp->data_len, (unsigned long long)tp->numel, itemsize,
                            (unsigned long long)(tp->numel * itemsize));
    }
    if (tp->name_len == 4 && memcmp(tp->name, "bool", 4) == 0) {
        for (uint32_t i = 0; i < tp->data_len; i++) {
            if (tp->data[i] > 1) {
                return dec_fail_int(d, tp->data + i, "bool tensor has a byte 0x%x that is neither 0 nor 1",
                                    tp->data[i]);
            }
        }
    }
    return 0;
}

/* torch.empty(shape, dtype=...) filled with the payload's bytes, sized against
 * the storage torch really gave. */
static PyObject *
dec_tensor_build(Decoder *d, const unsigned char *at, const TensorPayload *tp)
{
    CodecState *cs = d->cs;
    PyObject *shape = NULL, *t = NULL, *result = NULL;
    char *dst = NULL;
    size_t avail = 0;
    if ((shape = PyTuple_New((Py_ssize_t)tp->ndim)) == NULL) {
        goto done;
    }
    for (uint32_t i = 0; i < tp->ndim; i++) {
        PyObject *dim = PyLong_FromLongLong(tp->dims[i]);
        if (dim == NULL) {
            goto done;
        }
        PyTuple_SET_ITEM(shape, i, dim);
    }
    PyObject *call_args[2] = {shape, PyTuple_GET_ITEM(tp->entry, 0)};
    if ((t = PyObject_Vectorcall(cs->empty, call_args, 1, cs->kw_dtype)) == NULL) {
        dec_fail_from(d, at, "cannot create the tensor");
        goto done;
    }
    if (Py_TYPE(t) != (PyTypeObject *)cs->Tensor) { /* a torch function mode may answer anything */
        PyErr_Format(PyExc_TypeError, "torch.empty gave a %s, not a torch.Tensor", Py_TYPE(t)->tp_name);
        dec_fail_from(d, at, "cannot create the tensor");
        goto done;
    }
    if (tp->data_len > 0) {
        if (codec_tensor_span(cs, t, &dst, &avail) < 0) {
            dec_fail_from(d, at, "cannot create the tensor");
            goto done;
        }
        if (dst == NULL || avail < tp->data_len) {
            dec_fail(d, tp->data_at, "tensor data has %u bytes, but torch.empty gave storage for %zu",
                     (unsigned int)tp->data_len, avail);
            goto done;
        }
        memcpy(dst, tp->data, tp->data_len);
    }
    result = Py_NewRef(t);
done:
    Py_XDECREF(shape);
    Py_XDECREF(t);
    return result;
}

static PyObject *
decode_tensor(Decoder *d, const unsigned char *at)
{
    TensorPayload tp = {0};
    PyObject *result = NULL;
    if (dec_tensor_dtype(d, at, &tp) == 0 && dec_tensor_shape(d, &tp) == 0 && dec_tensor_data(d, &tp) == 0) {
        result = dec_tensor_build(d, at, &tp);
    }
    Py_XDECREF(tp.entry);
    return result;
}

/* ---- ext types ---- */

/* torch.Size(items): every item an int first (torch would accept more). */
static PyObject *
dec_size(Decoder *d, const unsigned char *at, const unsigned char *arr_at, PyObject *items)
{
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(items); i++) {
        if (!PyLong_CheckExact(PyTuple_GET_ITEM(items, i))) {
            return dec_fail(d, arr_at, "torch.Size item %u is a %s, not an int", (unsigned int)i,
                            Py_TYPE(PyTuple_GET_ITEM(items, i))->tp_name);
        }
    }
    if ((result = PyObject_CallOneArg(d->cs->Size, items)) == NULL) {
        dec_fail_from(d, at, "invalid torch.Size");
    }
    return result;
}

/* Codes whose payload is one msgpack array: tuple, torch.Size, slice. */
static PyObject *
decode_ext_items(Decoder *d, const unsigned char *at, int code, int depth)
{
    PyObject *items = NULL, *result = NULL;
    const char *what = code == EXT_TUPLE ? "tuple payload" : code == EXT_SIZE ? "torch.Size payload" : "slice payload";
    const unsigned char *arr_at = d->p;
    uint32_t n = 0;
    if (dec_expect_array(d, what, &n) < 0 || (items = decode_array(d, arr_at, n, depth, 1)) == NULL) {
        goto done;
    }
    if (code == EXT_TUPLE) {
        result = Py_NewRef(items);
    }
    else if (code == EXT_SIZE) {
        result = dec_size(d, at, arr_at, items);
    }
    else if (n != 3) {
        dec_fail(d, arr_at, "slice payload must be an array of 3 (start, stop, step), not %u", (unsigned int)n);
    }
    else {
        result = PySlice_New(PyTuple_GET_ITEM(items, 0), PyTuple_GET_ITEM(items, 1), PyTuple_GET_ITEM(items, 2));
    }
done:
    Py_XDECREF(items);
    return result;
}

/* Codes whose payload is raw bytes (not msgpack-framed): consumed whole. */
static PyObject *
decode_ext_raw(Decoder *d, const unsigned char *at, int code, const unsigned char *payload, uint32_t len)
{
    PyObject *entry = NULL, *name = NULL, *result = NULL;
    d->p = payload + len;
    if (code == EXT_TENSOR_REF) {
        result = decode_tensor_ref(d, at, payload, len);
    }
    else if (code == EXT_DTYPE) {
        if ((entry = dec_lookup_dtype(d, at, payload, len)) != NULL) {
            result = Py_NewRef(PyTuple_GET_ITEM(entry, 0));
        }
    }
    else if ((name = dec_name(d, at, payload, len, "device")) != NULL &&
             (result = PyObject_CallOneArg(d->cs->device_type, name)) == NULL) {
        dec_fail_from(d, at, "invalid device");
    }
    Py_XDECREF(entry);
    Py_XDECREF(name);
    return result;
}

/* An ext of `len` payload bytes whose header is at `at` (d->p: the type byte).
 * Reads inside it cannot run past the payload, and must consume it exactly. */
static PyObject *
decode_ext(Decoder *d, const unsigned char *at, uint32_t len, int depth)
{
    PyObject *result = NULL;
    const unsigned char *outer_end = d->end;
    if (dec_need(d, at, 1 + (uint64_t)len, "ext") < 0) {
        return NULL;
    }
    int code = (int)(int8_t)*d->p++;
    const unsigned char *payload = d->p, *payload_end = d->p + len;
    d->end = payload_end;

    switch (code) {
    case EXT_TUPLE:
    case EXT_SIZE:
    case EXT_SLICE:
        result = decode_ext_items(d, at, code, depth);
        break;
    case EXT_TENSOR:
        result = decode_tensor(d, at);
        break;
    case EXT_TENSOR_REF:
    case EXT_DTYPE:
    case EXT_DEVICE:
        result = decode_ext_raw(d, at, code, payload, len);
        break;
    default:
        dec_fail(d, at, "unknown ext type %d", code);
        break;
    }
    if (result != NULL && d->p != payload_end) {
        dec_fail(d, d->p, "%zd unexpected bytes at the end of an ext %d payload",
                 (Py_ssize_t)(payload_end - d->p), code);
        Py_CLEAR(result);
    }
    d->end = outer_end;
    return result;
}

/* ---- dispatch ---- */

/* The types whose header carries a 1-, 2- or 4-byte length or count. */
static PyObject *
decode_sized(Decoder *d, const unsigned char *at, unsigned char b, int depth)
{
    uint32_t n = 0;
    switch (b) {
    case 0xc4:
    case 0xc5:
    case 0xc6:
        return dec_read_len(d, at, 1 << (b - 0xc4), "bin", &n) < 0 ? NULL : decode_bin(d, at, n);
    case 0xc7:
    case 0xc8:
    case 0xc9:
        return dec_read_len(d, at, 1 << (b - 0xc7), "ext", &n) < 0 ? NULL : decode_ext(d, at, n, depth);
    case 0xd9:
    case 0xda:
    case 0xdb:
        return dec_read_len(d, at, 1 << (b - 0xd9), "str", &n) < 0 ? NULL : decode_str(d, at, n);
    case 0xdc:
    case 0xdd:
        return dec_read_len(d, at, 2 << (b - 0xdc), "array", &n) < 0 ? NULL : decode_array(d, at, n, depth, 0);
    case 0xde:
    case 0xdf:
        return dec_read_len(d, at, 2 << (b - 0xde), "map", &n) < 0 ? NULL : decode_map(d, at, n, depth);
    default: /* 0xc1 */
        return dec_fail(d, at, "byte 0x%x is not a msgpack type", b);
    }
}

static PyObject *
decode_obj(Decoder *d, int depth)
{
    const unsigned char *at = d->p;
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
    case 0xca:
    case 0xcb:
        return decode_float(d, at, b);
    case 0xcc: case 0xcd: case 0xce: case 0xcf:
    case 0xd0: case 0xd1: case 0xd2: case 0xd3:
        return decode_int(d, at, b);
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: /* fixext 1..16 */
        return decode_ext(d, at, 1u << (b - 0xd4), depth);
    default:
        return decode_sized(d, at, b, depth);
    }
}

PyObject *
codec_decode(CodecState *cs, const void *buf, Py_ssize_t len, PyObject *tensors, PyObject *source)
{
    Decoder d = {.cs = cs, .tensors = tensors, .source = source};
    PyObject *result = NULL;
    d.base = d.p = (const unsigned char *)buf;
    d.end = d.base + len;
    if ((result = decode_obj(&d, 0)) == NULL) {
        dec_add_path(&d);
    }
    else if (d.p != d.end) {
        dec_fail(&d, d.p, "%zd trailing bytes after the encoded state", (Py_ssize_t)(d.end - d.p));
        Py_CLEAR(result);
    }
    for (int i = 0; i < CODEC_STR_CACHE; i++) {
        Py_XDECREF(d.str_cache[i]);
    }
    Py_XDECREF(d.path);
    return result;
}
