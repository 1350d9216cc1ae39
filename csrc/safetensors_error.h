/* How the safetensors code reports a bad file or a bad argument: CheckpointError
 * "<path>: <what>" (modelopt_c.CheckpointError, a ValueError), and the path
 * arguments every entry point takes. */
#ifndef MODELOPT_C_SAFETENSORS_ERROR_H
#define MODELOPT_C_SAFETENSORS_ERROR_H

#include "module_state.h"

/* Raise CheckpointError("<display>: <message>").  Returns -1. */
int sft_fail(ModuleState *st, PyObject *display, const char *fmt, ...);

/* Replace the exception being raised by one saying "<display>: <what>: <its
 * message>", the original as its __cause__.  OSError and KeyboardInterrupt pass
 * through unchanged; BufferError and plain ValueError become CheckpointError; any
 * other type is kept.  Returns -1. */
int sft_rewrap(ModuleState *st, PyObject *display, const char *what_fmt, ...);

/* OSError(saved_errno, strerror, display): for a system call that ran without the
 * GIL (errno saved before the GIL came back).  Returns -1. */
int sft_os_error(PyObject *display, int saved_errno);

/* Path argument -> *fsbytes (filesystem encoding) and *display (str, for
 * messages): two new references, or -1 with both NULL. */
int sft_path_args(PyObject *path, PyObject **fsbytes, PyObject **display);

#endif
