/* Strong-reference getters from newer CPython, for the 3.10-3.12 we also build on.
 * Each mirrors the documented semantics of its 3.13 namesake exactly. */
#ifndef MODELOPT_C_COMPAT_H
#define MODELOPT_C_COMPAT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if PY_VERSION_HEX < 0x030D0000
/* 1 and a new reference when found, 0 and NULL when absent, -1 on error. */
static inline int
PyDict_GetItemRef(PyObject *d, PyObject *key, PyObject **result)
{
    PyObject *item = PyDict_GetItemWithError(d, key);
    if (item != NULL) {
        *result = Py_NewRef(item);
        return 1;
    }
    *result = NULL;
    return PyErr_Occurred() ? -1 : 0;
}

static inline int
PyObject_GetOptionalAttr(PyObject *obj, PyObject *name, PyObject **result)
{
    *result = PyObject_GetAttr(obj, name);
    if (*result != NULL) {
        return 1;
    }
    if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}
#endif

#if PY_VERSION_HEX < 0x030C0000
/* The raised exception, taken out of the error indicator (a new reference; NULL
 * when none is set), and the reverse (steals `exc`; NULL clears).  3.12's API. */
static inline PyObject *
PyErr_GetRaisedException(void)
{
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
}

static inline void
PyErr_SetRaisedException(PyObject *exc)
{
    if (exc == NULL) {
        PyErr_Clear();
        return;
    }
    PyObject *type = Py_NewRef((PyObject *)Py_TYPE(exc));
    PyErr_Restore(type, exc, PyException_GetTraceback(exc));
}
#endif

#endif
