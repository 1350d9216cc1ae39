/* The per-module state of modelopt_c._conversion: every type, exception, interned
 * string and cached Python object lives here, none in C globals (multi-phase init). */
#ifndef MODELOPT_C_MODULE_STATE_H
#define MODELOPT_C_MODULE_STATE_H

#include "compat.h"
#include "errors.h"
#include "codec_module.h"
#include "checkpoint.h"
#include "safetensors.h"

typedef struct {
    PyTypeObject *StateManagerType;
    PyObject *ApplyModeError;

    /* torch objects, imported once at module exec */
    PyObject *nn_Module;      /* torch.nn.Module */
    PyObject *deepcopy;       /* copy.deepcopy */
    PyObject *deque;          /* collections.deque */

    /* modelopt_c._runtime: the Python glue the core calls (registries, model-likes,
     * wrappers, versions, torch I/O).  Imported on first use, because the package
     * imports this module before _runtime exists. */
    PyObject *runtime;

    /* interned strings */
    PyObject *s_state_key;    /* "_modelopt_state" */
    PyObject *s_version_key;  /* "_modelopt_state_version" */
    PyObject *s_modules;      /* "_modules" */
    PyObject *s_config;
    PyObject *s_metadata;
    PyObject *s_modelopt_state_dict;
    PyObject *s_modelopt_version;
    PyObject *s_modelopt_state;
    PyObject *s_model_state_dict;
    PyObject *s_name;
    PyObject *s_config_class;
    PyObject *s_convert;
    PyObject *s_restore;
    PyObject *s_export_mode;
    PyObject *s_is_export_mode;
    PyObject *s_next_modes;
    PyObject *s_next_prohibited_modes;
    PyObject *s_update_for_save;
    PyObject *s_update_for_new_mode;
    PyObject *s_save_mode_in_state;
    PyObject *s_model_dump;
    PyObject *s_state_dict;
    PyObject *s_load_state_dict;

    CodecState codec;         /* owned by codec_state.c */
    CheckpointState ckpt;     /* owned by checkpoint.c */
    SftState sft;             /* owned by safetensors.c */
} ModuleState;

/* The state of the module that defined `type` (for methods of our heap types). */
ModuleState *module_state_from_type(PyTypeObject *type);
/* The state of this extension module object. */
static inline ModuleState *
module_state(PyObject *module)
{
    return (ModuleState *)PyModule_GetState(module);
}

/* A new reference to attribute `name` of modelopt_c._runtime. */
PyObject *runtime_attr(ModuleState *st, const char *name);
/* Call modelopt_c._runtime.<name>(*args); a new reference or NULL. */
PyObject *runtime_call(ModuleState *st, const char *name, PyObject *const *args, size_t nargs);

/* Defined in state_manager.c */
extern PyType_Spec state_manager_spec;
extern PyMethodDef conversion_methods[];   /* conversion.c */

/* checkpoint.c, for conversion.c.  ckpt_save: call = {f, modelopt_state, state_dict,
 * format or None, torch.save kwargs}; returns None.  ckpt_load_weights copies
 * `state_dict` into the model's own tensors in place (strict); `source` names the
 * file in errors. */
PyObject *ckpt_save(ModuleState *st, PyObject *const *call);
/* torch.save(obj, path) through the crash-safe writer; None (the CLI's convert). */
PyObject *ckpt_save_torch_file(ModuleState *st, PyObject *path, PyObject *obj);
int ckpt_load_weights(ModuleState *st, PyObject *model, PyObject *state_dict, PyObject *source);

#endif
