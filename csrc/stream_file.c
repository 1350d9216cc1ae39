/* modelopt_c._conversion.StreamFile: stream_sink.c for Python, the byte pump of the
 * torch-format writer (modelopt_c/torch_zip.py).  Python lays out the zip records;
 * every byte goes through here with the GIL released. */
#include "module_state.h"
#include "stream_sink.h"

#include <errno.h>

typedef struct {
    PyObject_HEAD
    StreamSink sink;
    PyObject *path;  /* for messages */
    int open;        /* 1 until finish() or close() */
    int busy;        /* a call is writing with the GIL released */
} StreamFileObject;

static int
sf_check(StreamFileObject *self)
{
    if (!self->open) {
        PyErr_Format(PyExc_ValueError, "StreamFile %R is finished or closed", self->path);
        return -1;
    }
    if (self->busy) {
        PyErr_Format(PyExc_RuntimeError, "StreamFile %R is being written by another thread", self->path);
        return -1;
    }
    return 0;
}

static PyObject *
sf_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"path", "direct", "chunk", NULL};
    PyObject *path = NULL, *encoded = NULL, *direct_obj = Py_None;
    int direct, r, err = 0;
    Py_ssize_t chunk = 8 << 20;
    StreamFileObject *self = NULL;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$On:StreamFile", kwlist, &path, &direct_obj, &chunk)) {
        return NULL;
    }
    direct = direct_obj == Py_None ? stream_sink_direct_wanted() : PyObject_IsTrue(direct_obj);
    if (direct < 0) {
        return NULL;
    }
    if (chunk <= 0 || chunk % STREAM_SINK_ALIGN != 0 || chunk > (1 << 30)) {
        PyErr_SetString(PyExc_ValueError, "StreamFile: chunk must be a positive multiple of 4096, at most 2**30");
        return NULL;
    }
    if (!PyUnicode_FSConverter(path, &encoded)) {
        return NULL;
    }
    if ((self = (StreamFileObject *)type->tp_alloc(type, 0)) == NULL) {
        goto done;
    }
    self->path = Py_NewRef(path);
    Py_BEGIN_ALLOW_THREADS
    r = stream_sink_open(&self->sink, PyBytes_AS_STRING(encoded), (size_t)chunk, direct);
    err = errno;
    Py_END_ALLOW_THREADS
    if (r < 0) {
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        Py_CLEAR(self);
        goto done;
    }
    self->open = 1;
done:
    Py_XDECREF(encoded);
    return (PyObject *)self;
}

/* Append [data, data + n) with the GIL released; the CRC-32 of those bytes. */
static PyObject *
sf_pump(StreamFileObject *self, const void *data, size_t n)
{
    uint32_t crc = 0;
    int r, err = 0;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    r = stream_sink_write(&self->sink, data, n, &crc);
    err = errno;
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (r < 0) {
        errno = err;
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, self->path);
    }
    return PyLong_FromUnsignedLong(crc);
}

PyDoc_STRVAR(sf_write_doc,
"write(data, /)\n--\n\n"
"Append the bytes of ``data`` (any buffer) and return their CRC-32.  The bytes\n"
"are copied before this returns: ``data`` may change or go away after it.");

static PyObject *
sf_write(StreamFileObject *self, PyObject *data)
{
    Py_buffer view = {0};
    if (sf_check(self) < 0 || PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result = sf_pump(self, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(sf_write_storage_doc,
"write_storage(storage, /)\n--\n\n"
"Append the bytes of a CPU ``torch.UntypedStorage`` (no copy made first) and\n"
"return their CRC-32.");

/* The data pointer and size of a CPU torch.UntypedStorage; -1 with TypeError for
 * anything else (another device's pointer must never be read from here). */
static int
cpu_storage_bytes(PyObject *storage, void **data, Py_ssize_t *n)
{
    PyObject *torch = NULL, *cls = NULL, *device = NULL, *kind = NULL, *ptr = NULL, *size = NULL;
    int result = -1, r;
    if ((torch = PyImport_ImportModule("torch")) == NULL ||
        (cls = PyObject_GetAttrString(torch, "UntypedStorage")) == NULL ||
        (r = PyObject_IsInstance(storage, cls)) < 0) {
        goto done;
    }
    if (!r) {
        PyErr_Format(PyExc_TypeError, "write_storage: expected a torch.UntypedStorage, not %.200s",
                     Py_TYPE(storage)->tp_name);
        goto done;
    }
    if ((device = PyObject_GetAttrString(storage, "device")) == NULL ||
        (kind = PyObject_GetAttrString(device, "type")) == NULL) {
        goto done;
    }
    if (!PyUnicode_Check(kind) || PyUnicode_CompareWithASCIIString(kind, "cpu") != 0) {
        PyErr_Format(PyExc_TypeError, "write_storage: the storage is on %R, not the CPU", device);
        goto done;
    }
    if ((ptr = PyObject_CallMethod(storage, "data_ptr", NULL)) == NULL ||
        (size = PyObject_CallMethod(storage, "nbytes", NULL)) == NULL) {
        goto done;
    }
    *data = PyLong_AsVoidPtr(ptr);
    *n = PyLong_AsSsize_t(size);
    if (PyErr_Occurred()) {
        goto done;
    }
    if (*n < 0 || (*data == NULL && *n > 0)) {
        PyErr_Format(PyExc_ValueError, "write_storage: a storage of %zd bytes at %p", *n, *data);
        goto done;
    }
    result = 0;
done:
    Py_XDECREF(torch);
    Py_XDECREF(cls);
    Py_XDECREF(device);
    Py_XDECREF(kind);
    Py_XDECREF(ptr);
    Py_XDECREF(size);
    return result;
}

static PyObject *
sf_write_storage(StreamFileObject *self, PyObject *storage)
{
    void *data = NULL;
    Py_ssize_t n = 0;
    if (sf_check(self) < 0 || cpu_storage_bytes(storage, &data, &n) < 0) {
        return NULL;
    }
    return sf_pump(self, data, (size_t)n); /* the caller's reference keeps the storage alive */
}

static PyObject *
sf_tell(StreamFileObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLongLong(stream_sink_tell(&self->sink));
}

PyDoc_STRVAR(sf_finish_doc,
"finish()\n--\n\n"
"Write out everything and close the file (not fsynced: the caller commits).");

static PyObject *
sf_finish(StreamFileObject *self, PyObject *Py_UNUSED(ignored))
{
    int r, err = 0;
    if (sf_check(self) < 0) {
        return NULL;
    }
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    r = stream_sink_finish(&self->sink);
    err = errno;
    stream_sink_close(&self->sink);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    self->open = 0;
    if (r < 0) {
        errno = err;
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, self->path);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(sf_close_doc,
"close()\n--\n\n"
"Stop writing and close the file as it is (after an error: the caller removes it).");

static PyObject *
sf_close(StreamFileObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy) {
        return PyErr_Format(PyExc_RuntimeError, "StreamFile %R is being written by another thread", self->path);
    }
    if (self->open) {
        self->open = 0;
        Py_BEGIN_ALLOW_THREADS
        stream_sink_close(&self->sink);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyObject *
sf_enter(StreamFileObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef(self);
}

static PyObject *
sf_exit(StreamFileObject *self, PyObject *Py_UNUSED(args))
{
    return sf_close(self, NULL);
}

static PyObject *
sf_get_direct(StreamFileObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->open && stream_sink_is_direct(&self->sink));
}

static void
sf_dealloc(StreamFileObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->open) {
        stream_sink_close(&self->sink);
    }
    Py_XDECREF(self->path);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyMethodDef sf_methods[] = {
    {"write", (PyCFunction)sf_write, METH_O, sf_write_doc},
    {"write_storage", (PyCFunction)sf_write_storage, METH_O, sf_write_storage_doc},
    {"tell", (PyCFunction)sf_tell, METH_NOARGS, "tell()\n--\n\nBytes written so far."},
    {"finish", (PyCFunction)sf_finish, METH_NOARGS, sf_finish_doc},
    {"close", (PyCFunction)sf_close, METH_NOARGS, sf_close_doc},
    {"__enter__", (PyCFunction)sf_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)sf_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef sf_getset[] = {
    {"direct", (getter)sf_get_direct, NULL, "Whether writes bypass the page cache (O_DIRECT) now.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(sf_doc,
"StreamFile(path, *, direct=None, chunk=8388608)\n--\n\n"
"A sequential writer of a new file: every write is copied into one of two\n"
"buffers and returns the CRC-32 of its bytes, while a thread writes the other\n"
"buffer, with O_DIRECT where the file system allows (``direct``; None: unless\n"
"the environment says MODELOPT_C_DIRECT_IO=0), through the page cache otherwise.\n"
"``finish()`` completes the file; nothing is fsynced.");

static PyType_Slot sf_slots[] = {
    {Py_tp_doc, (void *)sf_doc},
    {Py_tp_new, sf_new},
    {Py_tp_dealloc, sf_dealloc},
    {Py_tp_methods, sf_methods},
    {Py_tp_getset, sf_getset},
    {0, NULL},
};

PyType_Spec stream_file_spec = {
    .name = "modelopt_c._conversion.StreamFile",
    .basicsize = sizeof(StreamFileObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = sf_slots,
};
