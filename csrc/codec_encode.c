/* The codec's encoder: walks the state and writes it through msgpack-c's packer
 * straight into the result bytes (an inline tensor is copied exactly once).  A
 * failure names the key path of the value that caused it. */
#include "codec_encode.h"

#include "codec_path.h"
#include "codec_tensor.h"
#include "codec_wire.h"
#include "errors.h"

#include <msgpack.h>
#include <stdarg.h>
#include <string.h>

/* The packer's output: a bytes object grown in place and trimmed at the end, so
 * the result needs no final copy. */
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
     * codec_encode() raises once with the full key path. */
    PyObject *err_type; /* borrowed exception type */
    PyObject *err_msg;
    PyObject *pending;
    PyObject *path;     /* list of str components, innermost first */
    int in_key;         /* the failure is inside a dict key */
} Encoder;

/* ---- failures and their key path ---- */

/* Record the codec's own failure (no exception is raised until enc_raise).  -1. */
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

/* Move a raised foreign exception into enc->pending (the first one wins), so the
 * path can be recorded with no exception set. */
static void
enc_stash(Encoder *enc)
{
    PyObject *exc = PyErr_GetRaisedException();
    if (enc->pending == NULL) {
        enc->pending = exc;
    }
    else {
        Py_XDECREF(exc);
    }
}

/* On the way out of a failed item: record where it was.  All return -1. */
static int
enc_trace_index(Encoder *enc, Py_ssize_t i)
{
    enc_stash(enc);
    codec_path_push_index(&enc->path, i);
    return -1;
}

static int
enc_trace_text(Encoder *enc, const char *text)
{
    enc_stash(enc);
    codec_path_push_text(&enc->path, text);
    return -1;
}

static int
enc_trace_key(Encoder *enc, PyObject *key, int depth)
{
    enc_stash(enc);
    codec_path_push_key(&enc->path, key, depth, PY_SSIZE_T_MAX);
    return -1;
}

/* A dict key failed: what its own containers recorded is inside the key. */
static int
enc_trace_in_key(Encoder *enc)
{
    enc_stash(enc);
    Py_CLEAR(enc->path);
    enc->in_key = 1;
    return -1;
}

/* Raise the recorded failure with its key path ("?" if the path cannot be made). */
static void
enc_raise(Encoder *enc)
{
    enc_stash(enc); /* a failure at the top level */
    PyObject *path = codec_path_render(enc->path);
    if (enc->err_type != NULL && enc->err_msg != NULL) {
        PyErr_Format(enc->err_type, "%U%s at %V", enc->err_msg, enc->in_key ? " in a dict key" : "",
                     path, "?");
    }
    else if (enc->pending != NULL) {
        PyErr_SetRaisedException(enc->pending);
        enc->pending = NULL;
        err_add_note("while encoding the modelopt state%s at %V", enc->in_key ? " (a dict key)" : "",
                     path, "?");
    }
    else {
        PyErr_SetString(PyExc_SystemError, "encode_state failed without an error");
    }
    Py_XDECREF(path);
}

/* ---- scalars and containers ---- */

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
        PyErr_Clear(); /* checked: over 2**64-1, reported below with its size */
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

/* The header of a msgpack array of `n` items (a `what`: "list", "tuple"). */
static int
encode_array_header(Encoder *enc, Py_ssize_t n, const char *what)
{
    if (check_len32(enc, (size_t)n, what) < 0) {
        return -1;
    }
    return msgpack_pack_array(&enc->pk, (size_t)n) < 0 ? enc_nomem() : 0;
}

static int
encode_list(Encoder *enc, PyObject *obj, int depth)
{
    Py_ssize_t n = PyList_GET_SIZE(obj);
    if (encode_array_header(enc, n, "list") < 0) {
        return -1;
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
    if (encode_array_header(enc, n, "tuple") < 0) {
        return -1;
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

/* ---- torch objects and slices ---- */

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
        goto done;
    }
    if (n < 1 || n > CODEC_MAX_NAME) {
        rc = enc_fail(enc, PyExc_ValueError, "cannot encode device %R (name longer than %d bytes)",
                      obj, CODEC_MAX_NAME);
        goto done;
    }
    rc = encode_name_ext(enc, EXT_DEVICE, s, n);
done:
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

/* ---- tensors ---- */

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

/* A tensor of a type other than torch.Tensor / nn.Parameter: say what to do. */
static int
refuse_tensor_subclass(Encoder *enc, PyObject *obj)
{
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
                    Py_TYPE(obj)->tp_name);
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

    if (Py_TYPE(obj) != (PyTypeObject *)cs->Tensor && Py_TYPE(obj) != (PyTypeObject *)cs->Parameter) {
        return refuse_tensor_subclass(enc, obj);
    }
    if ((flag = codec_tensor_flag(obj, cs->s_is_meta, 0)) != 0) {
        if (flag > 0) {
            enc_fail(enc, PyExc_TypeError,
                     "cannot encode a meta tensor (it has no data): materialise it first, e.g. "
                     "t.to_empty(device='cpu') and fill in its values");
        }
        goto done;
    }
    if ((flag = codec_tensor_flag(obj, cs->s_is_nested, 0)) != 0) {
        if (flag > 0) {
            enc_fail(enc, PyExc_TypeError,
                     "cannot encode a nested tensor: store t.unbind() (a list of tensors) instead");
        }
        goto done;
    }
    if ((layout = PyObject_GetAttr(obj, cs->s_layout)) == NULL) {
        goto done;
    }
    if (layout != cs->strided) {
        enc_fail(enc, PyExc_TypeError,
                 "cannot encode a tensor with layout %R %s(only strided tensors; call .to_dense() first)",
                 layout, how);
        goto done;
    }
    if ((flag = codec_tensor_flag(obj, cs->s_is_quantized, 0)) != 0) {
        if (flag > 0 && (dtype = PyObject_GetAttr(obj, cs->s_dtype)) != NULL) {
            enc_fail(enc, PyExc_TypeError,
                     "cannot encode a quantized tensor (dtype %R): its scales and zero points have "
                     "no encoding; store t.dequantize(), or t.int_repr() with the quantization "
                     "parameters as separate values",
                     dtype);
        }
        goto done;
    }
    rc = 0;
done:
    Py_XDECREF(layout);
    Py_XDECREF(dtype);
    return rc;
}

/* By reference: the caller stores the tensor (through DLPack, which drops the
 * lazy conj/neg bits), so hand it over with those bits resolved; write its index. */
static int
encode_tensor_ref(Encoder *enc, PyObject *obj)
{
    CodecState *cs = enc->cs;
    PyObject *t = Py_NewRef(obj);
    unsigned char index_be[8];
    int conj = 0, neg = 0, rc = -1;
    store_be64(index_be, (uint64_t)PyList_GET_SIZE(enc->tensors));
    if ((conj = codec_tensor_flag(t, cs->s_is_conj, 1)) < 0 ||
        (conj && codec_tensor_chain(&t, cs->s_resolve_conj) < 0) ||
        (neg = codec_tensor_flag(t, cs->s_is_neg, 1)) < 0 ||
        (neg && codec_tensor_chain(&t, cs->s_resolve_neg) < 0) || PyList_Append(enc->tensors, t) < 0) {
        goto done;
    }
    rc = encode_name_ext(enc, EXT_TENSOR_REF, (const char *)index_be, 8);
done:
    Py_XDECREF(t);
    return rc;
}

/* What an inline tensor writes: its host image and the facts read from it. */
typedef struct {
    PyObject *t;        /* the contiguous CPU torch.Tensor whose bytes are written */
    PyObject *dtype;
    PyObject *name;     /* b"float32" */
    PyObject *shape;    /* tuple of ints */
    size_t nbytes;
    char *data;         /* its first byte (NULL when nbytes == 0) */
} TensorImage;

static void
tensor_image_clear(TensorImage *img)
{
    Py_CLEAR(img->t);
    Py_CLEAR(img->dtype);
    Py_CLEAR(img->name);
    Py_CLEAR(img->shape);
}

/* img->t = obj detached -> host -> plain values (no lazy conj/neg bits) -> C order. */
static int
tensor_image_host(Encoder *enc, PyObject *obj, TensorImage *img)
{
    CodecState *cs = enc->cs;
    img->t = Py_NewRef(obj);
    if (codec_tensor_chain(&img->t, cs->s_detach) < 0 || codec_tensor_chain(&img->t, cs->s_cpu) < 0 ||
        codec_tensor_chain(&img->t, cs->s_resolve_conj) < 0 ||
        codec_tensor_chain(&img->t, cs->s_resolve_neg) < 0 ||
        codec_tensor_chain(&img->t, cs->s_contiguous) < 0) {
        return -1;
    }
    if (Py_TYPE(img->t) != (PyTypeObject *)cs->Tensor) {
        /* a torch function mode may answer anything */
        return enc_fail(enc, PyExc_TypeError, "tensor.detach().cpu().contiguous() gave a %s, not a torch.Tensor",
                        Py_TYPE(img->t)->tp_name);
    }
    return 0;
}

/* img->dtype, ->name, ->shape and ->nbytes of the host image, checked. */
static int
tensor_image_facts(Encoder *enc, TensorImage *img)
{
    CodecState *cs = enc->cs;
    PyObject *nbytes = NULL;
    int rc = -1;
    if ((img->dtype = PyObject_GetAttr(img->t, cs->s_dtype)) == NULL) {
        goto done;
    }
    if ((rc = PyDict_GetItemRef(cs->name_by_dtype, img->dtype, &img->name)) <= 0) {
        if (rc == 0) {
            enc_fail(enc, PyExc_TypeError, "cannot encode a tensor of dtype %R (not known to the codec)",
                     img->dtype);
        }
        rc = -1;
        goto done;
    }
    rc = -1;
    if ((img->shape = PyObject_GetAttr(img->t, cs->s_shape)) == NULL ||
        (nbytes = PyObject_GetAttr(img->t, cs->s_nbytes)) == NULL) {
        goto done;
    }
    if (!PyTuple_Check(img->shape) || !PyLong_Check(nbytes)) {
        PyErr_Format(PyExc_TypeError, "tensor.shape/.nbytes are a %s and a %s, not a tuple and an int",
                     Py_TYPE(img->shape)->tp_name, Py_TYPE(nbytes)->tp_name);
        goto done;
    }
    if (PyTuple_GET_SIZE(img->shape) > CODEC_MAX_NDIM) {
        enc_fail(enc, PyExc_ValueError, "cannot encode a tensor of %zd dims (at most %d)",
                 PyTuple_GET_SIZE(img->shape), CODEC_MAX_NDIM);
        goto done;
    }
    img->nbytes = PyLong_AsSize_t(nbytes);
    if (img->nbytes == (size_t)-1 && PyErr_Occurred()) {
        goto done;
    }
    rc = check_len32(enc, img->nbytes, "tensor of bytes");
done:
    Py_XDECREF(nbytes);
    return rc;
}

/* img->data, checked to hold img->nbytes bytes in the storage itself. */
static int
tensor_image_data(Encoder *enc, TensorImage *img)
{
    size_t avail = 0;
    if (img->nbytes == 0) {
        return 0;
    }
    if (codec_tensor_span(enc->cs, img->t, &img->data, &avail) < 0) {
        return -1;
    }
    if (img->nbytes > avail || img->data == NULL) {
        /* numel * itemsize is more than the storage holds: a packed dtype */
        return enc_fail(enc, PyExc_TypeError,
                        "cannot encode a tensor of dtype %R inline: it claims %zu bytes but its storage "
                        "holds %zu (a packed sub-byte dtype?); convert it to a plain dtype first",
                        img->dtype, img->nbytes, avail);
    }
    return 0;
}

static int
encode_shape(Encoder *enc, PyObject *shape)
{
    Py_ssize_t ndim = PyTuple_GET_SIZE(shape);
    if (msgpack_pack_array(&enc->pk, (size_t)ndim) < 0) {
        return enc_nomem();
    }
    for (Py_ssize_t i = 0; i < ndim; i++) {
        long long dim = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
        if (dim == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (dim < 0) {
            PyErr_SetString(PyExc_ValueError, "tensor has a negative dimension");
            return -1;
        }
        if (msgpack_pack_uint64(&enc->pk, (uint64_t)dim) < 0) {
            return enc_nomem();
        }
    }
    return 0;
}

/* ext32 [dtype name, shape, bin data], reserved in one growth. */
static int
encode_tensor_image(Encoder *enc, const TensorImage *img)
{
    size_t mark = 0, name_len = (size_t)PyBytes_GET_SIZE(img->name);
    size_t ndim = (size_t)PyTuple_GET_SIZE(img->shape);
    if (outbuf_reserve(&enc->buf, img->nbytes + 32 + name_len + 9 * ndim) < 0 ||
        ext32_open(enc, EXT_TENSOR, &mark) < 0) {
        return -1;
    }
    if (msgpack_pack_array(&enc->pk, 3) < 0 ||
        msgpack_pack_str_with_body(&enc->pk, PyBytes_AS_STRING(img->name), name_len) < 0) {
        return enc_nomem();
    }
    if (encode_shape(enc, img->shape) < 0) {
        return -1;
    }
    if (msgpack_pack_bin(&enc->pk, img->nbytes) < 0 ||
        (img->nbytes > 0 && msgpack_pack_bin_body(&enc->pk, img->data, img->nbytes) < 0)) {
        return enc_nomem();
    }
    return ext32_close(enc, mark);
}

static int
encode_tensor(Encoder *enc, PyObject *obj)
{
    TensorImage img = {0};
    int rc = -1;
    if (check_tensor_kind(enc, obj, enc->tensors != NULL ? "" : "inline ") < 0) {
        return -1;
    }
    if (enc->tensors != NULL) {
        return encode_tensor_ref(enc, obj);
    }
    if (tensor_image_host(enc, obj, &img) < 0 || tensor_image_facts(enc, &img) < 0 ||
        tensor_image_data(enc, &img) < 0) {
        goto done;
    }
    rc = encode_tensor_image(enc, &img);
done:
    tensor_image_clear(&img);
    return rc;
}

/* ---- dispatch ---- */

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

PyObject *
codec_encode(CodecState *cs, PyObject *obj, PyObject *tensors)
{
    Encoder enc = {.cs = cs, .tensors = tensors};
    PyObject *result = NULL;
    msgpack_packer_init(&enc.pk, &enc.buf, outbuf_write);

    if (encode_obj(&enc, obj, 0) < 0) {
        enc_raise(&enc);
        goto done;
    }
    /* trim to the bytes written (every encoding has at least one) */
    if (_PyBytes_Resize(&enc.buf.bytes, (Py_ssize_t)enc.buf.size) < 0) {
        enc.buf.bytes = NULL;
        goto done;
    }
    result = enc.buf.bytes;
    enc.buf.bytes = NULL;
done:
    Py_XDECREF(enc.buf.bytes);
    Py_XDECREF(enc.err_msg);
    Py_XDECREF(enc.pending);
    Py_XDECREF(enc.path);
    return result;
}
