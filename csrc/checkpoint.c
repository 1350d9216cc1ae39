/* Checkpoint I/O for the torch format: crash-safe replacement of the target file
 * (temp file in the same folder, fsync, rename, fsync the folder) and the in-place
 * weight loader, which copies each saved tensor into the model's own through the
 * ATen bridge so no second copy of the weights is ever held. */
#include "module_state.h"
#include "aten_bridge.h"
#include "atomic_file.h"

#include <errno.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>


/* ---- crash-safe replacement ------------------------------------------------------ */

/* Raise OSError(err) for writing `path` (the target, not our temp name: that is the
 * path the user knows).  A full disk or a file-size limit says so in words, and that
 * the old file is unchanged; the exception set before (torch's), if any, becomes the
 * new one's __cause__. */
static void
raise_write_error(int err, PyObject *path)
{
    const char *what = err == ENOSPC   ? "no space left on device"
                       : err == EDQUOT ? "disk quota exceeded"
                       : err == EFBIG  ? "file too large (the process's file-size limit, ulimit -f)"
                                       : NULL;
    PyObject *cause = PyErr_GetRaisedException(), *msg = NULL, *exc = NULL;

    if (what == NULL) {
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
    }
    else if ((msg = PyUnicode_FromFormat("%s while writing the checkpoint; the old file is unchanged", what)) != NULL &&
             (exc = PyObject_CallFunction(PyExc_OSError, "iOO", err, msg, path)) != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    }
    if (cause != NULL) {
        /* the new error (or the error of making it) gets torch's as its cause */
        PyObject *raised = PyErr_GetRaisedException();
        if (raised != NULL) {
            PyException_SetCause(raised, Py_NewRef(cause));
            PyException_SetContext(raised, Py_NewRef(cause));
            PyErr_SetRaisedException(raised);
        }
    }
    Py_XDECREF(cause);
    Py_XDECREF(msg);
    Py_XDECREF(exc);
}

/* Why torch.save failed, when the file system says so: torch reports a failed write
 * as "enforce fail ... unexpected pos", losing errno.  0 when nothing points there. */
static int
write_failure_errno(int fd)
{
    struct statvfs vfs;
    struct stat sb;
    struct rlimit lim;
    if (fstatvfs(fd, &vfs) == 0 && (unsigned long long)vfs.f_bavail * vfs.f_frsize < (1ULL << 20)) {
        return ENOSPC;
    }
    if (fstat(fd, &sb) == 0 && getrlimit(RLIMIT_FSIZE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY &&
        (unsigned long long)sb.st_size + 65536 > (unsigned long long)lim.rlim_cur) {
        return EFBIG;
    }
    return 0;
}

/* writer(obj, tmp, **kwargs) so that `path` is replaced atomically: torch.save, or
 * the caller's own writer of the same file.  `started` (borrowed; NULL: none) is
 * called with the temp file's path before the writer runs: writers write with the GIL
 * released, so a Python thread can watch the file grow (progress) at no cost to them. */
static PyObject *
save_torch_atomic(PyObject *writer, PyObject *path_obj, PyObject *obj, PyObject *kwargs, PyObject *started)
{
    PyObject *encoded = NULL, *tmp_obj = NULL, *args = NULL, *res = NULL, *result = NULL;
    AtomicFile af = {.fd = -1};
    int r, err = 0;

    if (!PyUnicode_FSConverter(path_obj, &encoded)) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    r = atomic_file_open(&af, PyBytes_AS_STRING(encoded));
    err = errno;
    if (r == 0) {
        atomic_file_start_writeback(&af); /* disk writes overlap the writer's work */
    }
    Py_END_ALLOW_THREADS
    if (r < 0) {
        raise_write_error(err, path_obj);
        goto done;
    }
    if ((tmp_obj = PyUnicode_DecodeFSDefault(af.tmp)) == NULL || (args = PyTuple_Pack(2, obj, tmp_obj)) == NULL) {
        goto done;
    }
    if (started != NULL && (res = PyObject_CallOneArg(started, tmp_obj)) == NULL) {
        goto done; /* the temp file is removed by atomic_file_close */
    }
    Py_CLEAR(res);
    if ((res = PyObject_Call(writer, args, kwargs)) == NULL) {
        if (PyErr_ExceptionMatches(PyExc_RuntimeError) || PyErr_ExceptionMatches(PyExc_OSError)) {
            if ((err = write_failure_errno(af.fd)) != 0) {
                raise_write_error(err, path_obj);
            }
        }
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    r = atomic_file_commit(&af);
    err = errno;
    Py_END_ALLOW_THREADS
    if (r < 0) {
        raise_write_error(err, path_obj);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    atomic_file_close(&af);
    Py_XDECREF(encoded);
    Py_XDECREF(tmp_obj);
    Py_XDECREF(args);
    Py_XDECREF(res);
    return result;
}

/* Take our private option `name` out of `*rest` (a copy of the caller's kwargs, made
 * on first need): *value gets a new reference, or NULL when absent or None.  -1 with
 * TypeError when it is there but not callable. */
static int
pop_callable(PyObject *kwargs, PyObject **rest, const char *name, PyObject **value)
{
    PyObject *key = NULL, *found = NULL;
    int result = -1;
    *value = NULL;
    if ((key = PyUnicode_FromString(name)) == NULL) {
        goto done;
    }
    if (kwargs == NULL || PyDict_GetItemRef(kwargs, key, &found) == 0) {
        result = 0;
        goto done;
    }
    if (found == NULL) {
        goto done;
    }
    if (*rest == NULL && (*rest = PyDict_Copy(kwargs)) == NULL) {
        goto done;
    }
    if (PyDict_DelItem(*rest, key) < 0) {
        goto done;
    }
    if (found != Py_None && !PyCallable_Check(found)) {
        PyErr_Format(PyExc_TypeError, "_save_torch_file: %s must be callable or None, not %.200s", name,
                     Py_TYPE(found)->tp_name);
        goto done;
    }
    *value = found == Py_None ? NULL : Py_NewRef(found);
    result = 0;
done:
    Py_XDECREF(key);
    Py_XDECREF(found);
    return result;
}

/* torch.save(obj, path, **kwargs) through the crash-safe writer (save, the CLI's convert).
 * Two options of ours, not torch.save's, come out of kwargs (the caller's dict is left
 * as it is): "_started" is save_torch_atomic's `started`, "_writer" a
 * writer(obj, tmp_path) used instead of torch.save. */
PyObject *
ckpt_save_torch_file(ModuleState *st, PyObject *path, PyObject *obj, PyObject *kwargs)
{
    PyObject *fspath = NULL, *started = NULL, *writer = NULL, *rest = NULL, *result = NULL;
    if ((fspath = PyOS_FSPath(path)) == NULL || pop_callable(kwargs, &rest, "_started", &started) < 0 ||
        pop_callable(kwargs, &rest, "_writer", &writer) < 0) {
        goto done;
    }
    result = save_torch_atomic(writer != NULL ? writer : st->ckpt.torch_save, fspath, obj,
                               rest != NULL ? rest : kwargs, started);
done:
    Py_XDECREF(fspath);
    Py_XDECREF(started);
    Py_XDECREF(writer);
    Py_XDECREF(rest);
    return result;
}

/* ---- in-place loading --------------------------------------------------------- */

/* An owned bridge handle over `tensor` (detached), or NULL with an exception. */
static AtbTensor *
bridge_handle(CheckpointState *cs, PyObject *tensor)
{
    PyObject *detached = NULL, *capsule = NULL;
    AtbTensor *handle = NULL;
    AtbError err = {{0}};

    if ((detached = PyObject_CallMethodNoArgs(tensor, cs->s_detach)) == NULL ||
        (capsule = PyObject_CallOneArg(cs->to_dlpack, detached)) == NULL) {
        goto done;
    }
    void *dlm = PyCapsule_GetPointer(capsule, "dltensor");
    if (dlm == NULL || PyCapsule_SetName(capsule, "used_dltensor") < 0) {
        goto done;
    }
    if (atb_from_dlpack(dlm, &handle, &err) < 0) {
        PyErr_Format(PyExc_RuntimeError, "ATen could not take the tensor: %s", err.msg);
        handle = NULL;
    }
done:
    Py_XDECREF(detached);
    Py_XDECREF(capsule);
    return handle;
}

/* dst.detach().copy_(src): torch's own copy, for what DLPack cannot carry (quantized,
 * sparse, a negative or conjugate bit, which DLPack would drop or refuse). */
static int
torch_copy(CheckpointState *cs, PyObject *dst, PyObject *src)
{
    PyObject *detached = PyObject_CallMethodNoArgs(dst, cs->s_detach);
    PyObject *res = detached ? PyObject_CallMethodOneArg(detached, cs->s_copy_, src) : NULL;
    Py_XDECREF(detached);
    Py_XDECREF(res);
    return res == NULL ? -1 : 0;
}

/* dst[...] = src, in place, bytes moved by ATen with the GIL released.  Falls back to
 * Tensor.copy_ for what DLPack cannot carry (e.g. some float8 builds). */
static int
copy_in_place(CheckpointState *cs, PyObject *dst, PyObject *src, PyObject *key)
{
    AtbTensor *d = NULL, *s = NULL;
    AtbError err = {{0}};
    int r = -1;

    if ((d = bridge_handle(cs, dst)) == NULL || (s = bridge_handle(cs, src)) == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_BufferError) && !PyErr_ExceptionMatches(PyExc_RuntimeError) &&
            !PyErr_ExceptionMatches(PyExc_TypeError)) {
            goto done;
        }
        PyErr_Clear(); /* one of the three checked above: DLPack cannot carry it, torch's copy_ can */
        r = torch_copy(cs, dst, src);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    r = atb_copy_into(d, s, &err);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        PyErr_Format(PyExc_RuntimeError, "could not copy %R into the model: %s", key, err.msg);
    }
done:
    if (d != NULL) {
        atb_free(d);
    }
    if (s != NULL) {
        atb_free(s);
    }
    return r;
}

/* How _runtime.check_weights says each tensor is loaded. */
enum { LOAD_BRIDGE = 0, LOAD_TORCH_COPY = 1, LOAD_ASSIGN = 2 };

/* src.nbytes of plan entry `item` (a tensor from the file); -1 with an exception. */
static long long
entry_nbytes(PyObject *item)
{
    PyObject *n = PyObject_GetAttrString(PyTuple_GET_ITEM(item, 2), "nbytes");
    long long v = n == NULL ? -1 : PyLong_AsLongLong(n);
    Py_XDECREF(n);
    return v;
}

int
ckpt_load_weights(ModuleState *st, PyObject *model, PyObject *state_dict, PyObject *source, PyObject *progress)
{
    CheckpointState *cs = &st->ckpt;
    PyObject *plan = NULL, *res = NULL;
    long long total = 0, done_bytes = 0;
    int result = -1;

    /* every key, shape, dtype and kind is checked there before the first byte moves;
     * models with their own (save or load) logic are loaded there by torch's loader */
    PyObject *args[3] = {model, state_dict, source};
    if ((plan = runtime_call(st, CB_PLAN_LOAD, args, 3)) == NULL) {
        goto done;
    }
    if (plan == Py_None) {
        result = 0;
        goto done;
    }
    if (!PyList_Check(plan)) {
        PyErr_Format(PyExc_TypeError, "_runtime.plan_load returned a %.200s, not a list", Py_TYPE(plan)->tp_name);
        goto done;
    }
    for (Py_ssize_t i = 0; progress != NULL && i < PyList_GET_SIZE(plan); i++) {
        PyObject *item = PyList_GET_ITEM(plan, i);
        long long n = PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 4 ? entry_nbytes(item) : 0;
        if (n < 0) {
            goto done;
        }
        total += n;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(plan); i++) {
        PyObject *item = PyList_GET_ITEM(plan, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4 || !PyLong_Check(PyTuple_GET_ITEM(item, 3))) {
            PyErr_Format(PyExc_TypeError, "_runtime.plan_load: entry %zd is not (key, dst, src, how)", i);
            goto done;
        }
        PyObject *key = PyTuple_GET_ITEM(item, 0), *dst = PyTuple_GET_ITEM(item, 1),
                 *src = PyTuple_GET_ITEM(item, 2);
        long how = PyLong_AsLong(PyTuple_GET_ITEM(item, 3));
        if (how == -1 && PyErr_Occurred()) {
            goto done;
        }
        /* hold the entry: a copy_ may run Python code that drops the plan's references */
        Py_INCREF(item);
        long long n = progress != NULL ? entry_nbytes(item) : 0;
        int r;
        if (n < 0) {
            r = -1;
        }
        else if (how == LOAD_ASSIGN) {
            /* nothing to copy into (meta model): the file's tensor becomes the model's */
            PyObject *assign_args[3] = {model, key, src};
            res = runtime_call(st, CB_ASSIGN_TENSOR, assign_args, 3);
            r = res == NULL ? -1 : 0;
            Py_CLEAR(res);
        }
        else if (how == LOAD_TORCH_COPY) {
            r = torch_copy(cs, dst, src);
        }
        else {
            r = copy_in_place(cs, dst, src, key);
        }
        Py_DECREF(item);
        if (r < 0) {
            goto done;
        }
        if (progress != NULL) {
            done_bytes += n;
            if ((res = PyObject_CallFunction(progress, "LL", done_bytes, total)) == NULL) {
                goto done; /* the hook's exception ends the load, as a failed copy does: rolled back */
            }
            Py_CLEAR(res);
        }
    }
    result = 0;
done:
    Py_XDECREF(plan);
    Py_XDECREF(res);
    return result;
}

/* ---- module plumbing ---------------------------------------------------------- */

PyMethodDef checkpoint_methods[] = {{NULL, NULL, 0, NULL}};

int
checkpoint_state_init(PyObject *module, CheckpointState *cs)
{
    (void)module;
    PyObject *torch = PyImport_ImportModule("torch"), *torch_c = NULL;
    if (torch == NULL) {
        return -1;
    }
    cs->torch_save = PyObject_GetAttrString(torch, "save");
    torch_c = PyObject_GetAttrString(torch, "_C");
    Py_DECREF(torch);
    if (torch_c != NULL) {
        cs->to_dlpack = PyObject_GetAttrString(torch_c, "_to_dlpack");
        Py_DECREF(torch_c);
    }
    if (cs->torch_save == NULL || cs->to_dlpack == NULL ||
        (cs->s_detach = PyUnicode_InternFromString("detach")) == NULL ||
        (cs->s_copy_ = PyUnicode_InternFromString("copy_")) == NULL) {
        return -1;
    }
    return 0;
}

int
checkpoint_state_traverse(CheckpointState *cs, visitproc visit, void *arg)
{
    Py_VISIT(cs->torch_save);
    Py_VISIT(cs->to_dlpack);
    return 0;
}

void
checkpoint_state_clear(CheckpointState *cs)
{
    Py_CLEAR(cs->torch_save);
    Py_CLEAR(cs->s_detach);
    Py_CLEAR(cs->to_dlpack);
    Py_CLEAR(cs->s_copy_);
}
