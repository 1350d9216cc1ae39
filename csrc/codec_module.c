/* The codec's Python face: encode_state() and decode_state() of
 * modelopt_c._conversion (METH_FASTCALL | METH_KEYWORDS), their argument checks,
 * and the hand-over to codec_encode() / codec_decode() with the module's state. */
#include "codec_module.h"

#include "args.h"

#include "codec_decode.h"
#include "codec_encode.h"
#include "module_state.h"

PyDoc_STRVAR(encode_state_doc,
"encode_state($module, obj, /, tensors=None)\n"
"--\n"
"\n"
"Encode a modelopt state (or any value made of None, bool, int, float, str,\n"
"bytes, list, tuple, dict, torch.Tensor, torch.Size, torch.dtype, torch.device\n"
"and slice) as msgpack bytes.\n"
"\n"
"With ``tensors=None`` tensors are stored inline (dtype, shape, raw bytes).  With\n"
"a list, each tensor is appended to it and only its index is stored; pass the\n"
"same tensors, in order, to decode_state().\n"
"\n"
"Raises TypeError for a value of another type and OverflowError for an int\n"
"outside -2**63 .. 2**64-1; the message names the key path of the value.");

static PyObject *
codec_encode_state(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"obj", "tensors"};
    PyObject *argv[2] = {NULL, NULL};
    if (args_parse("encode_state", args, nargs, kwnames, names, 2, 2, 1, argv) < 0) {
        return NULL;
    }
    if (argv[1] == Py_None) {
        argv[1] = NULL;
    }
    if (argv[1] != NULL && !PyList_Check(argv[1])) {
        PyErr_Format(PyExc_TypeError, "encode_state() tensors must be a list or None, not %s",
                     Py_TYPE(argv[1])->tp_name);
        return NULL;
    }
    return codec_encode(&module_state(module)->codec, argv[0], argv[1]);
}

PyDoc_STRVAR(decode_state_doc,
"decode_state($module, data, /, tensors=None, *, source=None)\n"
"--\n"
"\n"
"Decode bytes written by encode_state() (any bytes-like object: bytes,\n"
"bytearray, memoryview, mmap).  Tensor references resolve against ``tensors``,\n"
"a sequence of tensors in the order encode_state() appended them.\n"
"\n"
"The input is treated as untrusted: anything that is not one complete, valid\n"
"encoding raises StateDecodeError (a ValueError) saying what is wrong and at\n"
"which byte offset; ``source`` (e.g. a file name) is named in the message.");

/* `source` (str or os.PathLike) as the str named in messages: a new reference. */
static PyObject *
source_text(PyObject *source)
{
    PyObject *text = PyUnicode_Check(source) ? Py_NewRef(source) : PyOS_FSPath(source);
    if (text != NULL && !PyUnicode_Check(text)) {
        Py_SETREF(text, PyObject_Str(text)); /* a bytes path */
    }
    return text;
}

static PyObject *
codec_decode_state(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"data", "tensors", "source"};
    PyObject *argv[3] = {NULL, NULL, NULL};
    PyObject *result = NULL, *source = NULL;
    Py_buffer view = {0};

    /* "source" is keyword-only: at most two positionals */
    if (args_parse("decode_state", args, nargs, kwnames, names, 3, 2, 1, argv) < 0) {
        return NULL;
    }
    if (argv[1] == Py_None) {
        argv[1] = NULL;
    }
    if (argv[1] != NULL && !PySequence_Check(argv[1])) {
        PyErr_Format(PyExc_TypeError, "decode_state() tensors must be a sequence or None, not %s",
                     Py_TYPE(argv[1])->tp_name);
        return NULL;
    }
    if (argv[2] != NULL && argv[2] != Py_None && (source = source_text(argv[2])) == NULL) {
        return NULL;
    }
    if (PyObject_GetBuffer(argv[0], &view, PyBUF_SIMPLE) < 0) {
        goto done;
    }
    result = codec_decode(&module_state(module)->codec, view.buf, view.len, argv[1], source);
    PyBuffer_Release(&view);
done:
    Py_XDECREF(source);
    return result;
}

PyMethodDef codec_methods[] = {
    {"encode_state", (PyCFunction)(void (*)(void))codec_encode_state, METH_FASTCALL | METH_KEYWORDS,
     encode_state_doc},
    {"decode_state", (PyCFunction)(void (*)(void))codec_decode_state, METH_FASTCALL | METH_KEYWORDS,
     decode_state_doc},
    {NULL, NULL, 0, NULL},
};
