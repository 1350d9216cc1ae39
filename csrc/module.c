/* modelopt_c._conversion: multi-phase module init, the module state's life cycle,
 * and runtime_call, the one way the core calls Python (the callbacks of module_state.h). */
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

static const char *const callback_names[CB_COUNT] = {
    [CB_AS_MODULE] = "as_module",
    [CB_IS_MODEL_LIKE] = "is_model_like",
    [CB_PREPARE_MODEL_FOR] = "prepare_model_for",
    [CB_UNWRAP] = "unwrap",
    [CB_GET_MODE_CONFIG] = "get_mode_config",
    [CB_GET_FROM_ANY] = "get_from_any",
    [CB_GET_REGISTRY_BY_NAME] = "get_registry_by_name",
    [CB_STATE_VERSION] = "state_version",
    [CB_PLAN_LOAD] = "plan_load",
    [CB_ASSIGN_TENSOR] = "assign_tensor",
};

PyObject *
runtime_call(ModuleState *st, Callback cb, PyObject *const *args, size_t nargs)
{
    PyObject *func = NULL, *result = NULL;

    if (st->runtime == NULL && (st->runtime = PyImport_ImportModule("modelopt_c._runtime")) == NULL) {
        goto done;
    }
    /* looked up per call, not cached: tests and users may patch _runtime */
    if ((func = PyObject_GetAttrString(st->runtime, callback_names[cb])) == NULL) {
        goto done;
    }
    result = PyObject_Vectorcall(func, args, nargs, NULL);
done:
    Py_XDECREF(func);
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
    INTERN(s_config_class, "config_class");
    INTERN(s_convert, "convert");
    INTERN(s_restore, "restore");
    INTERN(s_export_mode, "export_mode");
    INTERN(s_is_export_mode, "is_export_mode");
    INTERN(s_update_for_save, "update_for_save");
    INTERN(s_update_for_new_mode, "update_for_new_mode");
    INTERN(s_save_mode_in_state, "save_mode_in_state");
    INTERN(s_model_dump, "model_dump");

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

    PyObject *bases = PyTuple_Pack(2, PyExc_ValueError, PyExc_RuntimeError);
    st->CheckpointError = bases == NULL ? NULL : PyErr_NewExceptionWithDoc(
        "modelopt_c.CheckpointError",
        "A file that is not a readable checkpoint (not one, truncated, or corrupted).\n\n"
        "A ValueError (bad input) and, for code written against nvidia-modelopt (where\n"
        "torch.load raises RuntimeError), a RuntimeError too.",
        bases, NULL);
    Py_XDECREF(bases);
    if (st->CheckpointError == NULL ||
        PyModule_AddObjectRef(module, "CheckpointError", st->CheckpointError) < 0) {
        return -1;
    }

    st->StateManagerType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &state_manager_spec, NULL);
    /* the reference's class attributes, read by code outside the library (diffusers'
     * ModelOpt quantizer, Megatron-LM's distillation): the names of the model attributes */
    if (st->StateManagerType == NULL ||
        PyObject_SetAttrString((PyObject *)st->StateManagerType, "_state_key", st->s_state_key) < 0 ||
        PyObject_SetAttrString((PyObject *)st->StateManagerType, "_state_version_key", st->s_version_key) < 0 ||
        PyModule_AddType(module, st->StateManagerType) < 0) {
        return -1;
    }

    PyObject *stream_file = PyType_FromModuleAndSpec(module, &stream_file_spec, NULL);
    int added = stream_file == NULL ? -1 : PyModule_AddType(module, (PyTypeObject *)stream_file);
    Py_XDECREF(stream_file);
    if (added < 0) {
        return -1;
    }

    if (PyModule_AddFunctions(module, codec_methods) < 0 ||
        PyModule_AddFunctions(module, checkpoint_methods) < 0 ||
        PyModule_AddFunctions(module, sft_methods) < 0 ||
        codec_state_init(module, &st->codec) < 0 ||
        checkpoint_state_init(module, &st->ckpt) < 0 ||
        sft_state_init(&st->sft) < 0) {
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
    Py_VISIT(st->CheckpointError);
    Py_VISIT(st->nn_Module);
    Py_VISIT(st->deepcopy);
    Py_VISIT(st->deque);
    Py_VISIT(st->runtime);
    if (codec_state_traverse(&st->codec, visit, arg) < 0 ||
        checkpoint_state_traverse(&st->ckpt, visit, arg) < 0 ||
        sft_state_traverse(&st->sft, visit, arg) < 0) {
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
    Py_CLEAR(st->CheckpointError);
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
    Py_CLEAR(st->s_config_class);
    Py_CLEAR(st->s_convert);
    Py_CLEAR(st->s_restore);
    Py_CLEAR(st->s_export_mode);
    Py_CLEAR(st->s_is_export_mode);
    Py_CLEAR(st->s_update_for_save);
    Py_CLEAR(st->s_update_for_new_mode);
    Py_CLEAR(st->s_save_mode_in_state);
    Py_CLEAR(st->s_model_dump);
    codec_state_clear(&st->codec);
    checkpoint_state_clear(&st->ckpt);
    sft_state_clear(&st->sft);
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
