/* Key paths for the codec's error messages ("modelopt_state_dict[0][1]['metadata']"):
 * recorded innermost first while a failure unwinds, rendered once at the top.
 * Best effort throughout: a path that cannot be built never hides the error. */
#ifndef MODELOPT_C_CODEC_PATH_H
#define MODELOPT_C_CODEC_PATH_H

#include "compat.h"

#define CODEC_PATH_SHOWN 20 /* components shown at each end of a long key path */

/* Append one component to *path (a list, created on first use).  Called with no
 * exception set; leaves none (a component that cannot be made is left out). */
void codec_path_push_index(PyObject **path, Py_ssize_t i);      /* "[3]" */
void codec_path_push_text(PyObject **path, const char *text);   /* as is: ".start" */
/* A dict key: a top-level identifier str of at most `shown` characters bare
 * ("modelopt_state_dict"), anything else as its repr in brackets, cut to `shown`
 * characters ("['a'...]"); "[?]" when the repr fails. */
void codec_path_push_key(PyObject **path, PyObject *key, int depth, Py_ssize_t shown);

/* The path as text, outermost first ("the top level" when empty; long paths keep
 * both ends).  A new str, or NULL with no exception set when it cannot be made. */
PyObject *codec_path_render(PyObject *path);

#endif
