/* libFuzzer harness with C coverage feedback for modelopt_c's native parsers.
 *
 * One source, two targets (chosen at build time with -DFUZZ_TARGET=...):
 *   "codec"  -> fuzz/native_targets.py:codec(data)   the msgpack state decoder
 *                                                     (_conversion.decode_state)
 *   "header" -> fuzz/native_targets.py:header(data)  the safetensors reader
 *                                                     (_conversion.st_read on a memfd)
 *
 * The binary embeds CPython: LLVMFuzzerInitialize starts the interpreter, imports
 * torch and the extension once (built by fuzz/build_fuzz.sh with clang and
 * -fsanitize=fuzzer-no-link,address,undefined, so libFuzzer sees the extension's
 * edges through its 8-bit counters when the module is dlopen'ed), then each input
 * is one call of the Python check function.  That function returns normally for an
 * accepted input or a documented error and raises for anything else; a raise here
 * aborts, which libFuzzer reports as a crash and saves the input.
 *
 * Environment: FUZZ_TREE  the tree whose modelopt_c and fuzz/ are imported
 *                         (set by build_fuzz.sh's wrapper).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef FUZZ_TARGET
#error "build with -DFUZZ_TARGET=\"codec\" or -DFUZZ_TARGET=\"header\""
#endif

static PyObject *check_fn = NULL;

static void die(const char *what)
{
    fprintf(stderr, "fuzz_native: %s\n", what);
    if (PyErr_Occurred())
        PyErr_Print();
    fflush(stderr);
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *tree = getenv("FUZZ_TREE");
    if (tree == NULL)
        die("FUZZ_TREE is not set (run through the wrapper that fuzz/build_fuzz.sh writes)");
    Py_InitializeEx(0); /* no signal handlers: libFuzzer owns SIGINT/SIGALRM */
    PyObject *sys_path = PySys_GetObject("path"); /* borrowed */
    PyObject *fuzz_dir = PyUnicode_FromFormat("%s/fuzz", tree);
    PyObject *tree_dir = PyUnicode_FromString(tree);
    if (sys_path == NULL || fuzz_dir == NULL || tree_dir == NULL ||
        PyList_Insert(sys_path, 0, tree_dir) < 0 || PyList_Insert(sys_path, 0, fuzz_dir) < 0)
        die("cannot set sys.path");
    Py_DECREF(fuzz_dir);
    Py_DECREF(tree_dir);
    PyObject *mod = PyImport_ImportModule("native_targets");
    if (mod == NULL)
        die("cannot import fuzz/native_targets.py");
    check_fn = PyObject_GetAttrString(mod, FUZZ_TARGET);
    Py_DECREF(mod);
    if (check_fn == NULL || !PyCallable_Check(check_fn))
        die("native_targets has no target " FUZZ_TARGET);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    PyObject *arg = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)size);
    if (arg == NULL)
        die("cannot allocate the input bytes");
    PyObject *res = PyObject_CallOneArg(check_fn, arg);
    Py_DECREF(arg);
    if (res == NULL)
        die("the check failed (an undocumented exception or a wrong value); traceback:");
    Py_DECREF(res);
    return 0;
}
