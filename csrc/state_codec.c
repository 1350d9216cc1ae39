/* Placeholder until the codec lands: registers the decode error and no functions. */
#include "module_state.h"

PyMethodDef codec_methods[] = {{NULL, NULL, 0, NULL}};

int
codec_state_init(PyObject *module, CodecState *cs)
{
    cs->DecodeError = PyErr_NewExceptionWithDoc(
        "modelopt_c.StateDecodeError", "Bytes that are not a valid encoded modelopt state.",
        PyExc_ValueError, NULL);
    if (cs->DecodeError == NULL) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "StateDecodeError", cs->DecodeError);
}

int
codec_state_traverse(CodecState *cs, visitproc visit, void *arg)
{
    Py_VISIT(cs->DecodeError);
    return 0;
}

void
codec_state_clear(CodecState *cs)
{
    Py_CLEAR(cs->DecodeError);
}
