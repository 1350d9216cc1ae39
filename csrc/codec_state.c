/* Setting up and tearing down the codec's part of the module state: the
 * module-owned StateDecodeError, torch's classes and factory, the dtype tables
 * (only the dtypes this torch has, by canonical name) and interned method names. */
#include "codec_state.h"

#include <stddef.h>

/* dtypes the codec knows, by canonical name (str(dtype) minus "torch."); names this
 * torch lacks are skipped. */
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

/* torch.<name> if it is a torch.dtype whose str() is "torch.<name>": 1 and a new
 * reference, 0 when this torch has no such canonical dtype, -1 on error. */
static int
codec_canonical_dtype(CodecState *cs, PyObject *torch, const char *name, PyObject **out)
{
    PyObject *dtype = NULL, *text = NULL, *want = NULL;
    int rc = -1;
    *out = NULL;
    if ((dtype = PyObject_GetAttrString(torch, name)) == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear(); /* checked: this torch has no such dtype */
            rc = 0;
        }
        goto done;
    }
    if (!PyObject_TypeCheck(dtype, (PyTypeObject *)cs->dtype_type)) {
        rc = 0;
        goto done;
    }
    if ((text = PyObject_Str(dtype)) == NULL || (want = PyUnicode_FromFormat("torch.%s", name)) == NULL) {
        goto done;
    }
    rc = PyUnicode_Compare(text, want) == 0; /* an alias (e.g. torch.half) is skipped */
    if (rc == 0 && PyErr_Occurred()) {
        rc = -1;
    }
    if (rc == 1) {
        *out = Py_NewRef(dtype);
    }
done:
    Py_XDECREF(dtype);
    Py_XDECREF(text);
    Py_XDECREF(want);
    return rc;
}

static int
codec_build_dtype_tables(CodecState *cs, PyObject *torch)
{
    PyObject *dtype = NULL, *itemsize = NULL, *entry = NULL, *bname = NULL;
    int rc = -1;
    for (const char *const *np = codec_dtype_names; *np != NULL; np++) {
        int found = codec_canonical_dtype(cs, torch, *np, &dtype);
        if (found < 0) {
            goto done;
        }
        if (found == 0) {
            continue;
        }
        if ((itemsize = PyObject_GetAttrString(dtype, "itemsize")) == NULL ||
            (entry = PyTuple_Pack(3, dtype, itemsize,
                                  codec_dtype_is_quantized(*np) ? Py_False : Py_True)) == NULL ||
            (bname = PyBytes_FromString(*np)) == NULL ||
            PyDict_SetItemString(cs->dtype_by_name, *np, entry) < 0 ||
            PyDict_SetItem(cs->name_by_dtype, dtype, bname) < 0) {
            goto done;
        }
        Py_CLEAR(dtype);
        Py_CLEAR(itemsize);
        Py_CLEAR(entry);
        Py_CLEAR(bname);
    }
    rc = 0;
done:
    Py_XDECREF(dtype);
    Py_XDECREF(itemsize);
    Py_XDECREF(entry);
    Py_XDECREF(bname);
    return rc;
}

static int
codec_intern_names(CodecState *cs)
{
    static const struct {
        size_t offset;
        const char *text;
    } names[] = {
#define CODEC_NAME(field, text) {offsetof(CodecState, field), text}
        CODEC_NAME(s_detach, "detach"),
        CODEC_NAME(s_cpu, "cpu"),
        CODEC_NAME(s_contiguous, "contiguous"),
        CODEC_NAME(s_resolve_conj, "resolve_conj"),
        CODEC_NAME(s_resolve_neg, "resolve_neg"),
        CODEC_NAME(s_layout, "layout"),
        CODEC_NAME(s_dtype, "dtype"),
        CODEC_NAME(s_shape, "shape"),
        CODEC_NAME(s_nbytes, "nbytes"),
        CODEC_NAME(s_data_ptr, "data_ptr"),
        CODEC_NAME(s_untyped_storage, "untyped_storage"),
        CODEC_NAME(s_storage_offset, "storage_offset"),
        CODEC_NAME(s_element_size, "element_size"),
        CODEC_NAME(s_is_meta, "is_meta"),
        CODEC_NAME(s_is_nested, "is_nested"),
        CODEC_NAME(s_is_quantized, "is_quantized"),
        CODEC_NAME(s_is_conj, "is_conj"),
        CODEC_NAME(s_is_neg, "is_neg"),
#undef CODEC_NAME
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        PyObject **slot = (PyObject **)((char *)cs + names[i].offset);
        if ((*slot = PyUnicode_InternFromString(names[i].text)) == NULL) {
            return -1;
        }
    }
    cs->kw_dtype = PyTuple_Pack(1, cs->s_dtype);
    return cs->kw_dtype == NULL ? -1 : 0;
}

static int
codec_import_torch(CodecState *cs, PyObject *torch)
{
    PyObject *nn = NULL;
    int rc = -1;
    if ((cs->Tensor = PyObject_GetAttrString(torch, "Tensor")) == NULL ||
        (cs->Size = PyObject_GetAttrString(torch, "Size")) == NULL ||
        (nn = PyObject_GetAttrString(torch, "nn")) == NULL ||
        (cs->Parameter = PyObject_GetAttrString(nn, "Parameter")) == NULL ||
        (cs->dtype_type = PyObject_GetAttrString(torch, "dtype")) == NULL ||
        (cs->device_type = PyObject_GetAttrString(torch, "device")) == NULL ||
        (cs->strided = PyObject_GetAttrString(torch, "strided")) == NULL ||
        (cs->empty = PyObject_GetAttrString(torch, "empty")) == NULL) {
        goto done;
    }
    if (!PyType_Check(cs->Tensor) || !PyType_Check(cs->Parameter) || !PyType_Check(cs->Size) ||
        !PyType_Check(cs->dtype_type) || !PyType_Check(cs->device_type)) {
        PyErr_SetString(PyExc_ImportError,
                        "modelopt_c: torch.Tensor/nn.Parameter/Size/dtype/device are not types");
        goto done;
    }
    rc = 0;
done:
    Py_XDECREF(nn);
    return rc;
}

int
codec_state_init(PyObject *module, CodecState *cs)
{
    PyObject *torch = NULL;
    int rc = -1;

    cs->DecodeError = PyErr_NewExceptionWithDoc(
        "modelopt_c.StateDecodeError",
        "Bytes that are not a valid encoded modelopt state (truncated, corrupt or hostile).",
        PyExc_ValueError, NULL);
    if (cs->DecodeError == NULL ||
        PyModule_AddObjectRef(module, "StateDecodeError", cs->DecodeError) < 0 ||
        codec_intern_names(cs) < 0) {
        goto done;
    }
    if ((torch = PyImport_ImportModule("torch")) == NULL || codec_import_torch(cs, torch) < 0 ||
        (cs->dtype_by_name = PyDict_New()) == NULL || (cs->name_by_dtype = PyDict_New()) == NULL ||
        codec_build_dtype_tables(cs, torch) < 0) {
        goto done;
    }
    rc = 0;
done:
    Py_XDECREF(torch);
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
