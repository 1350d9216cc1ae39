/* Placeholder until checkpoint I/O lands. */
#include "module_state.h"

PyMethodDef checkpoint_methods[] = {{NULL, NULL, 0, NULL}};

int checkpoint_state_init(PyObject *module, CheckpointState *cs) { (void)module; cs->unused = NULL; return 0; }
int checkpoint_state_traverse(CheckpointState *cs, visitproc visit, void *arg) { Py_VISIT(cs->unused); return 0; }
void checkpoint_state_clear(CheckpointState *cs) { Py_CLEAR(cs->unused); }
