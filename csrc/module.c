/* modelopt_c._conversion: multi-phase module init, the module state's life cycle,
 * and the two helpers every file uses to reach the Python glue (_runtime). */
#include "module_state.h"

PyDoc_STRVAR(module_doc,
"Native core of modelopt_c: the modelopt state manager, the conversion functions\n"
"and the checkpoint I/O.  Import the public API from ``modelopt_c``.");

static struct PyModuleDef conversion_module;

ModuleState *
module_state_from_type(PyTypeObject *type)
{
    PyObject *module = PyType_GetModuleByDef(type, &conversion_module);
    return module == NULL ? NULL : module_state(module);
}

PyObject *
runtime_attr(ModuleState *st, const char *name)
{
    if (st->runtime == NULL) {
        st->runtime = PyImport_ImportModule("modelopt_c._runtime");
        if (st->runtime == NULL) {
            return NULL;
        }
    }
    return PyObject_GetAttrString(st->runtime, name);
}

PyObject *
runtime_call(ModuleState *st, const char *name, PyObject *const *args, size_t nargs)
{
    PyObject *func = runtime_attr(st, name);
    if (func == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Vectorcall(func, args, nargs, NULL);
    Py_DECREF(func);
    return result;
}

static PyObject *
import_attr(const char *module_name, const char *attr)
{
    PyObject *mod = PyImport_ImportModule(module_name);
    if (mod == NULL) {
        return NULL;
    }
    PyObject *value = PyObject_GetAttrString(mod, attr);
    Py_DECREF(mod);
    return value;
}

#define INTERN(field, text)                                     \
    do {                                                        \
        if ((st->field = PyUnicode_InternFromString(text)) == NULL) \
            return -1;                                          \
    } while (0)

static int
conversion_exec(PyObject *module)
{
    ModuleState *st = module_state(module);

    INTERN(s_state_key, "_modelopt_state");
    INTERN(s_version_key, "_modelopt_state_version");
    INTERN(s_modules, "_modules");
    INTERN(s_config, "config");
    INTERN(s_metadata, "metadata");
    INTERN(s_modelopt_state_dict, "modelopt_state_dict");
    INTERN(s_modelopt_version, "modelopt_version");
    INTERN(s_modelopt_state, "modelopt_state");
    INTERN(s_model_state_dict, "model_state_dict");
    INTERN(s_name, "name");
    INTERN(s_config_class, "config_class");
    INTERN(s_convert, "convert");
    INTERN(s_restore, "restore");
    INTERN(s_export_mode, "export_mode");
    INTERN(s_is_export_mode, "is_export_mode");
    INTERN(s_next_modes, "next_modes");
    INTERN(s_next_prohibited_modes, "next_prohibited_modes");
    INTERN(s_update_for_save, "update_for_save");
    INTERN(s_update_for_new_mode, "update_for_new_mode");
    INTERN(s_save_mode_in_state, "save_mode_in_state");
    INTERN(s_model_dump, "model_dump");
    INTERN(s_state_dict, "state_dict");
    INTERN(s_load_state_dict, "load_state_dict");

    if ((st->nn_Module = import_attr("torch.nn", "Module")) == NULL ||
        (st->deepcopy = import_attr("copy", "deepcopy")) == NULL ||
        (st->deque = import_attr("collections", "deque")) == NULL) {
        return -1;
    }

    st->ApplyModeError = PyErr_NewExceptionWithDoc(
        "modelopt_c.ApplyModeError",
        "Raised by a mode's convert or restore entry point when applying it fails.",
        PyExc_RuntimeError, NULL);
    if (st->ApplyModeError == NULL ||
        PyModule_AddObjectRef(module, "ApplyModeError", st->ApplyModeError) < 0) {
        return -1;
    }

    st->StateManagerType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &state_manager_spec, NULL);
    if (st->StateManagerType == NULL ||
        PyModule_AddType(module, st->StateManagerType) < 0) {
        return -1;
    }

    if (PyModule_AddFunctions(module, codec_methods) < 0 ||
        PyModule_AddFunctions(module, checkpoint_methods) < 0 ||
        PyModule_AddFunctions(module, st_format_methods) < 0 ||
        codec_state_init(module, &st->codec) < 0 ||
        checkpoint_state_init(module, &st->ckpt) < 0) {
        return -1;
    }
    return 0;
}

static int
conversion_traverse(PyObject *module, visitproc visit, void *arg)
{
    ModuleState *st = module_state(module);
    Py_VISIT(st->StateManagerType);
    Py_VISIT(st->ApplyModeError);
    Py_VISIT(st->nn_Module);
    Py_VISIT(st->deepcopy);
    Py_VISIT(st->deque);
    Py_VISIT(st->runtime);
    if (codec_state_traverse(&st->codec, visit, arg) < 0 ||
        checkpoint_state_traverse(&st->ckpt, visit, arg) < 0) {
        return -1;
    }
    return 0;
}

static int
conversion_clear(PyObject *module)
{
    ModuleState *st = module_state(module);
    Py_CLEAR(st->StateManagerType);
    Py_CLEAR(st->ApplyModeError);
    Py_CLEAR(st->nn_Module);
    Py_CLEAR(st->deepcopy);
    Py_CLEAR(st->deque);
    Py_CLEAR(st->runtime);
    Py_CLEAR(st->s_state_key);
    Py_CLEAR(st->s_version_key);
    Py_CLEAR(st->s_modules);
    Py_CLEAR(st->s_config);
    Py_CLEAR(st->s_metadata);
    Py_CLEAR(st->s_modelopt_state_dict);
    Py_CLEAR(st->s_modelopt_version);
    Py_CLEAR(st->s_modelopt_state);
    Py_CLEAR(st->s_model_state_dict);
    Py_CLEAR(st->s_name);
    Py_CLEAR(st->s_config_class);
    Py_CLEAR(st->s_convert);
    Py_CLEAR(st->s_restore);
    Py_CLEAR(st->s_export_mode);
    Py_CLEAR(st->s_is_export_mode);
    Py_CLEAR(st->s_next_modes);
    Py_CLEAR(st->s_next_prohibited_modes);
    Py_CLEAR(st->s_update_for_save);
    Py_CLEAR(st->s_update_for_new_mode);
    Py_CLEAR(st->s_save_mode_in_state);
    Py_CLEAR(st->s_model_dump);
    Py_CLEAR(st->s_state_dict);
    Py_CLEAR(st->s_load_state_dict);
    codec_state_clear(&st->codec);
    checkpoint_state_clear(&st->ckpt);
    return 0;
}

static void
conversion_free(void *module)
{
    (void)conversion_clear((PyObject *)module);
}

static PyModuleDef_Slot conversion_slots[] = {
    {Py_mod_exec, conversion_exec},
#ifdef Py_mod_multiple_interpreters /* 3.12+: torch's own modules cannot load in a subinterpreter */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil /* 3.13+: calls into torch and user callbacks rely on the GIL */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef conversion_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "modelopt_c._conversion",
    .m_doc = module_doc,
    .m_size = sizeof(ModuleState),
    .m_methods = conversion_methods,
    .m_slots = conversion_slots,
    .m_traverse = conversion_traverse,
    .m_clear = conversion_clear,
    .m_free = conversion_free,
};

PyMODINIT_FUNC
PyInit__conversion(void)
{
    return PyModuleDef_Init(&conversion_module);
}
