#include "module_state.h"
static PyType_Slot slots[] = {{0, NULL}};
PyType_Spec state_manager_spec = {"modelopt_c.ModeloptStateManager", 0, 0, Py_TPFLAGS_DEFAULT, slots};
