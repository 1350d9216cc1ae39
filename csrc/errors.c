/* The helpers of the error idiom described in errors.h. */
#include "errors.h"

#include <stdarg.h>

int
err_add_note(const char *format, ...)
{
    PyObject *exc = PyErr_GetRaisedException();
    if (exc == NULL) {
        return -1;
    }
    va_list va;
    va_start(va, format);
    PyObject *note = PyUnicode_FromFormatV(format, va);
    va_end(va);
    PyObject *res = note != NULL ? PyObject_CallMethod(exc, "add_note", "O", note) : NULL;
    if (res == NULL) {
        PyErr_Clear(); /* the note could not be made: the original error matters more */
    }
    Py_XDECREF(res);
    Py_XDECREF(note);
    PyErr_SetRaisedException(exc);
    return -1;
}

int
err_chain(PyObject *type, const char *format, ...)
{
    PyObject *cause = PyErr_GetRaisedException();
    va_list va;
    va_start(va, format);
    PyObject *msg = PyUnicode_FromFormatV(format, va);
    va_end(va);
    if (msg == NULL) {
        Py_XDECREF(cause);
        return -1;
    }
    PyErr_SetObject(type, msg);
    Py_DECREF(msg);
    if (cause != NULL) {
        PyObject *exc = PyErr_GetRaisedException();
        PyException_SetCause(exc, Py_NewRef(cause));   /* steals the new reference */
        PyException_SetContext(exc, cause);             /* steals ours */
        PyErr_SetRaisedException(exc);
    }
    return -1;
}
