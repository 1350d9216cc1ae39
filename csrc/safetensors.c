/* modelopt_c._conversion's safetensors functions: their docstrings and method
 * table, st_xxh64, and the module-state sub-struct (torch objects cached once at
 * module exec, so no call imports torch). */
#include "safetensors.h"
#include "xxh64.h"

int
sft_state_init(SftState *ss)
{
    PyObject *torch = PyImport_ImportModule("torch"), *nn = NULL, *torch_c = NULL;
    int rc = -1;
    if (torch == NULL || (ss->Tensor = PyObject_GetAttrString(torch, "Tensor")) == NULL ||
        (ss->strided = PyObject_GetAttrString(torch, "strided")) == NULL ||
        (ss->from_dlpack = PyObject_GetAttrString(torch, "from_dlpack")) == NULL ||
        (torch_c = PyObject_GetAttrString(torch, "_C")) == NULL ||
        (ss->to_dlpack = PyObject_GetAttrString(torch_c, "_to_dlpack")) == NULL ||
        (nn = PyObject_GetAttrString(torch, "nn")) == NULL ||
        (ss->Parameter = PyObject_GetAttrString(nn, "Parameter")) == NULL ||
        (ss->s_checksums = PyUnicode_InternFromString("checksums")) == NULL ||
        (ss->s_checksum_algorithm = PyUnicode_InternFromString("checksum_algorithm")) == NULL) {
        goto done;
    }
    rc = 0;
done:
    Py_XDECREF(torch);
    Py_XDECREF(nn);
    Py_XDECREF(torch_c);
    return rc;
}

int
sft_state_traverse(SftState *ss, visitproc visit, void *arg)
{
    Py_VISIT(ss->Tensor);
    Py_VISIT(ss->Parameter);
    Py_VISIT(ss->strided);
    Py_VISIT(ss->from_dlpack);
    Py_VISIT(ss->to_dlpack);
    return 0;
}

void
sft_state_clear(SftState *ss)
{
    Py_CLEAR(ss->Tensor);
    Py_CLEAR(ss->Parameter);
    Py_CLEAR(ss->strided);
    Py_CLEAR(ss->from_dlpack);
    Py_CLEAR(ss->to_dlpack);
    Py_CLEAR(ss->s_checksums);
    Py_CLEAR(ss->s_checksum_algorithm);
}

static PyObject *
sft_xxh64(PyObject *module, PyObject *data)
{
    Py_buffer view;
    uint64_t v;
    (void)module;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    v = xxh64_buffer(view.buf, (size_t)view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(v);
}

PyDoc_STRVAR(sft_write_doc,
"st_write($module, /, path, tensors, metadata, *, progress=None)\n--\n\n"
"Write a safetensors-compatible file crash-safely: a temporary file in the same\n"
"folder, fsync, rename over `path`, fsync of the folder.  `tensors` maps names to\n"
"torch tensors (any device, any layout; stored C-contiguous; device tensors are\n"
"staged through two pinned host buffers, copies overlapping writes), `metadata` maps str to\n"
"str.  XXH64 checksums of every tensor are added to the metadata under 'checksums'\n"
"and 'checksum_algorithm' (reserved keys).  `progress(done_bytes, total_bytes)` is\n"
"called as data is written; an exception from it aborts the write.  On any error\n"
"the temporary file is removed and `path` is left as it was.");

PyDoc_STRVAR(sft_read_doc,
"st_read($module, /, path, *, verify=False, _verify_if_present=False)\n--\n\n"
"Returns (metadata, tensors).  Read a safetensors file: validate its header (CheckpointError \"<path>: <what>\" on any\n"
"defect), map it copy-on-write and return the `__metadata__` dict and a dict of CPU\n"
"tensors over the mapping (zero-copy; writes to them never reach the file), in\n"
"header order.  The mapping lives until the last tensor over it is freed.\n"
"verify=True also checks the XXH64 checksums the writer stored (CheckpointError\n"
"naming the tensor on a mismatch, or when the file has no checksums; with\n"
"_verify_if_present=True a file without checksums is read unchecked).\n"
"Every defect of the file raises modelopt_c.CheckpointError, a ValueError.");

PyDoc_STRVAR(sft_read_header_doc,
"st_read_header($module, path, /)\n--\n\n"
"Validate a safetensors file's header without mapping its data: returns\n"
"(metadata, tensors, data_start): the\n"
"`__metadata__` dict, a dict name -> (dtype, shape, begin, end) in header order\n"
"(offsets relative to the data section), and the data section's file offset.");

PyDoc_STRVAR(sft_xxh64_doc,
"st_xxh64($module, data, /)\n--\n\n"
"The int XXH64 (seed 0) of a bytes-like object: the checksum the format stores.");

PyMethodDef sft_methods[] = {
    {"st_write", (PyCFunction)(void (*)(void))sft_write, METH_VARARGS | METH_KEYWORDS, sft_write_doc},
    {"st_read", (PyCFunction)(void (*)(void))sft_read, METH_VARARGS | METH_KEYWORDS, sft_read_doc},
    {"st_read_header", sft_read_header, METH_O, sft_read_header_doc},
    {"st_xxh64", sft_xxh64, METH_O, sft_xxh64_doc},
    {NULL, NULL, 0, NULL},
};
