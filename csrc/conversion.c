#include "module_state.h"
PyMethodDef conversion_methods[] = {{NULL, NULL, 0, NULL}};
