/* The errors of the safetensors format: every defect of a file is one
 * CheckpointError "<path>: <what>"; foreign errors met on the way get the same
 * prefix and keep their own type (safetensors_error.h says which). */
#include "safetensors_error.h"

#include <errno.h>
#include <stdarg.h>

/* Raise the module's CheckpointError "<display>: <msg>". */
static int
sft_raise(ModuleState *st, PyObject *display, PyObject *msg)
{
    PyObject *text = PyUnicode_FromFormat("%U: %U", display, msg);
    if (text != NULL) {
        PyErr_SetObject(st->CheckpointError, text);
        Py_DECREF(text);
    }
    return -1;
}

int
sft_fail(ModuleState *st, PyObject *display, const char *fmt, ...)
{
    PyObject *msg = NULL;
    va_list ap;
    va_start(ap, fmt);
    msg = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    if (msg == NULL) {
        goto done;
    }
    sft_raise(st, display, msg);
done:
    Py_XDECREF(msg);
    return -1;
}

/* The type sft_rewrap gives the replacement of `exc`: CheckpointError (`ck`) for
 * BufferError (what __dlpack__ raises for tensors it cannot export) and for a
 * plain ValueError (one type for the format's errors), else exc's own. */
static PyObject *
sft_rewrap_type(PyObject *exc, PyObject *ck)
{
    if (PyErr_GivenExceptionMatches(exc, PyExc_BufferError) ||
        (PyErr_GivenExceptionMatches(exc, PyExc_ValueError) && !PyErr_GivenExceptionMatches(exc, ck))) {
        return ck;
    }
    return (PyObject *)Py_TYPE(exc);
}

int
sft_rewrap(ModuleState *st, PyObject *display, const char *what_fmt, ...)
{
    PyObject *exc = PyErr_GetRaisedException(), *what = NULL, *msg = NULL, *new_exc = NULL;
    PyObject *ck = st->CheckpointError; /* borrowed */
    if (exc == NULL || PyErr_GivenExceptionMatches(exc, PyExc_OSError) ||
        PyErr_GivenExceptionMatches(exc, PyExc_KeyboardInterrupt)) {
        PyErr_SetRaisedException(exc); /* steals it */
        return -1;
    }
    va_list ap;
    va_start(ap, what_fmt);
    what = PyUnicode_FromFormatV(what_fmt, ap);
    va_end(ap);
    if (what == NULL || (msg = PyUnicode_FromFormat("%U: %U: %S", display, what, exc)) == NULL) {
        goto done;
    }
    PyObject *type = sft_rewrap_type(exc, ck);
    new_exc = PyObject_CallOneArg(type, msg);
    if (new_exc == NULL && type != ck && PyErr_ExceptionMatches(PyExc_TypeError)) {
        /* the foreign type's constructor takes other arguments: CheckpointError stands in */
        PyErr_Clear();
        new_exc = PyObject_CallOneArg(ck, msg);
    }
    if (new_exc == NULL || !PyExceptionInstance_Check(new_exc)) {
        if (new_exc != NULL) {
            PyErr_Format(PyExc_TypeError, "%.100s(...) did not make an exception", Py_TYPE(exc)->tp_name);
        }
        goto done;
    }
    PyException_SetCause(new_exc, Py_NewRef(exc)); /* steals the new reference */
    PyException_SetContext(new_exc, Py_NewRef(exc));
    PyErr_SetRaisedException(Py_NewRef(new_exc));
done:
    if (!PyErr_Occurred()) { /* cannot happen: every path above raised */
        PyErr_SetRaisedException(Py_NewRef(exc));
    }
    Py_XDECREF(exc);
    Py_XDECREF(what);
    Py_XDECREF(msg);
    Py_XDECREF(new_exc);
    return -1;
}

int
sft_os_error(PyObject *display, int saved_errno)
{
    errno = saved_errno;
    PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, display);
    return -1;
}

int
sft_path_args(PyObject *path, PyObject **fsbytes, PyObject **display)
{
    *display = NULL;
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
