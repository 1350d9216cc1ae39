/* The one error idiom of the C core, for every file:
 *
 *   - A function that holds references starts its locals at NULL and has one
 *     label, `done:`, that releases them on every path; `result` is set only on
 *     success.  No early return once something is held.
 *   - Context is added to the current exception as a note (err_add_note), never by
 *     rebuilding the exception or prefixing its message; a new exception that
 *     replaces a foreign one keeps it as __cause__ (err_chain).
 *   - An exception is held aside with PyErr_GetRaisedException() and put back
 *     with PyErr_SetRaisedException() (compat.h provides both before 3.12). */
#ifndef MODELOPT_C_ERRORS_H
#define MODELOPT_C_ERRORS_H

#include "compat.h"

/* Add a note (PyUnicode_FromFormat syntax) to the exception being raised; the
 * exception stays raised.  If the note itself cannot be made, the original
 * exception is kept without it.  Returns -1, for `return err_add_note(...)`. */
int err_add_note(const char *format, ...);

/* Raise `type(message)` with the exception being raised as its __cause__ (and
 * its context); with no exception set, just raise it.  Returns -1. */
int err_chain(PyObject *type, const char *format, ...);

#endif
