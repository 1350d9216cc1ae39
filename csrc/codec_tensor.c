/* Reading a torch tensor's facts and byte span for the codec, trusting nothing
 * torch (or a torch function mode) answers: every result is type-checked. */
#include "codec_tensor.h"

#include <stdint.h>

int
codec_tensor_chain(PyObject **t, PyObject *name)
{
    PyObject *next = PyObject_CallMethodNoArgs(*t, name);
    Py_SETREF(*t, next);
    return next == NULL ? -1 : 0;
}

int
codec_tensor_flag(PyObject *obj, PyObject *name, int call)
{
    PyObject *v = call ? PyObject_CallMethodNoArgs(obj, name) : PyObject_GetAttr(obj, name);
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

int
codec_tensor_int(PyObject *obj, PyObject *name, long long *out)
{
    PyObject *v = PyObject_CallMethodNoArgs(obj, name);
    int rc = -1;
    if (v == NULL) {
        return -1;
    }
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "tensor.%U() is a %s, not an int", name, Py_TYPE(v)->tp_name);
        goto done;
    }
    *out = PyLong_AsLongLong(v);
    rc = *out == -1 && PyErr_Occurred() ? -1 : 0;
done:
    Py_DECREF(v);
    return rc;
}

int
codec_tensor_span(CodecState *cs, PyObject *t, char **data, size_t *avail)
{
    PyObject *storage = NULL;
    long long sbytes = 0, sptr = 0, offset = 0, esize = 0, ptr = 0;
    int rc = -1;
    if ((storage = PyObject_CallMethodNoArgs(t, cs->s_untyped_storage)) == NULL ||
        codec_tensor_int(storage, cs->s_nbytes, &sbytes) < 0 ||
        codec_tensor_int(storage, cs->s_data_ptr, &sptr) < 0 ||
        codec_tensor_int(t, cs->s_storage_offset, &offset) < 0 ||
        codec_tensor_int(t, cs->s_element_size, &esize) < 0 ||
        codec_tensor_int(t, cs->s_data_ptr, &ptr) < 0) {
        goto done;
    }
    /* offset * esize <= sbytes, and data_ptr() must be where the storage says */
    if (sbytes < 0 || offset < 0 || esize <= 0 || offset > sbytes / esize ||
        (sbytes > 0 && (unsigned long long)ptr != (unsigned long long)sptr + (unsigned long long)(offset * esize))) {
        PyErr_Format(PyExc_SystemError,
                     "tensor storage is inconsistent (storage %lld bytes at 0x%llx, offset %lld elements "
                     "of %lld bytes, data at 0x%llx)",
                     sbytes, (unsigned long long)sptr, offset, esize, (unsigned long long)ptr);
        goto done;
    }
    *data = (char *)(uintptr_t)(unsigned long long)ptr;
    *avail = (size_t)(sbytes - offset * esize);
    rc = 0;
done:
    Py_XDECREF(storage);
    return rc;
}
