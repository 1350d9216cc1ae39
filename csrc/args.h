/* Argument parsing for METH_FASTCALL | METH_KEYWORDS functions: the reference's
 * parameter names, positional or by keyword, without an args tuple. */
#ifndef MODELOPT_C_ARGS_H
#define MODELOPT_C_ARGS_H

#include "compat.h"

/* Match (args, nargs, kwnames) against `names` (nnames of them): the first `npos` may be
 * passed positionally, the first `nreq` are required; out[i] gets a borrowed reference
 * or stays NULL.  0, or -1 with TypeError in CPython's wording, naming `fname`. */
int args_parse(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
               const char *const *names, Py_ssize_t nnames, Py_ssize_t npos, Py_ssize_t nreq, PyObject **out);

/* The one required argument `name` of `fname` (positional or keyword): borrowed, or NULL
 * with TypeError.  The fast path (one positional) costs one comparison. */
static inline PyObject *
args_one(const char *fname, const char *name, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *out = NULL;
    if (nargs == 1 && kwnames == NULL) {
        return args[0];
    }
    const char *const names[] = {name};
    return args_parse(fname, args, nargs, kwnames, names, 1, 1, 1, &out) < 0 ? NULL : out;
}

#endif
