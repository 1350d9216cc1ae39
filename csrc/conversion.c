/* The bookkeeping of SPEC §6: apply_mode, modelopt_state, get_mode, and the
 * transactional replay under restore / restore_from_modelopt_state (whose file
 * handling is modelopt_c/checkpoint.py's).  They drive the state manager; modes and
 * configs are called through the callbacks of module_state.h, never copied. */
#include "state_manager.h"

#include "args.h"

/* A new reference to the model itself, or to a ModelLikeModule holding its recipe. */
static PyObject *
as_module(ModuleState *st, PyObject *model)
{
    int is_module = PyObject_IsInstance(model, st->nn_Module);
    if (is_module < 0) {
        return NULL;
    }
    return is_module ? Py_NewRef(model) : runtime_call(st, CB_AS_MODULE, &model, 1);
}

static int
is_model_like(ModuleState *st, PyObject *model)
{
    PyObject *res = runtime_call(st, CB_IS_MODEL_LIKE, &model, 1);
    if (res == NULL) {
        return -1;
    }
    int r = PyObject_IsTrue(res);
    Py_DECREF(res);
    return r;
}

/* New reference: the built model when `model` is a holder, else `model`. */
static PyObject *
init_if_model_like(ModuleState *st, PyObject *model)
{
    int holder = is_model_like(st, model);
    if (holder < 0) {
        return NULL;
    }
    return holder ? PyObject_CallMethod(model, "init_modellike", NULL) : Py_NewRef(model);
}

static PyObject *
unwrap(ModuleState *st, PyObject *model, const char *how)
{
    PyObject *how_obj = PyUnicode_FromString(how);
    if (how_obj == NULL) {
        return NULL;
    }
    PyObject *args[2] = {model, how_obj};
    PyObject *result = runtime_call(st, CB_UNWRAP, args, 2);
    Py_DECREF(how_obj);
    return result;
}

/* Steals `model`; new reference to what the mode needs (holder or built model). */
static PyObject *
prepare_model_for(ModuleState *st, PyObject *model, PyObject *descriptor)
{
    PyObject *args[2] = {model, descriptor};
    PyObject *result = runtime_call(st, CB_PREPARE_MODEL_FOR, args, 2);
    Py_DECREF(model);
    return result;
}

static int
ensure_not_model_like(ModuleState *st, PyObject *model)
{
    int holder = is_model_like(st, model);
    if (holder > 0) {
        PyErr_SetString(PyExc_AssertionError, "Model must be a regular Module now!");
    }
    return holder == 0 ? 0 : -1;
}

/* The list of per-mode kwargs dicts (new reference), SPEC §6 mode_kwargs. */
static PyObject *
per_mode_kwargs(PyObject *mode_kwargs, Py_ssize_t n)
{
    if (mode_kwargs == Py_None || PyDict_Check(mode_kwargs)) {
        PyObject *list = PyList_New(n);
        for (Py_ssize_t i = 0; list != NULL && i < n; i++) {
            PyObject *d = mode_kwargs == Py_None ? PyDict_New() : Py_NewRef(mode_kwargs);
            if (d == NULL) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, i, d);
        }
        return list;
    }
    PyObject *list = PySequence_List(mode_kwargs);
    if (list == NULL) {
        return NULL;
    }
    if (PyList_GET_SIZE(list) != n) {
        PyErr_SetString(PyExc_AssertionError, "Number of mode kwargs must match number of modes!");
        Py_DECREF(list);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyDict_Check(PyList_GET_ITEM(list, i))) {
            PyErr_Format(PyExc_TypeError, "mode_kwargs[%zd] must be a dict, got %.200s", i,
                         Py_TYPE(PyList_GET_ITEM(list, i))->tp_name);
            Py_DECREF(list);
            return NULL;
        }
    }
    return list;
}

/* Validate what a mode's convert returned; new reference to the model, *metadata borrowed. */
static PyObject *
unpack_convert_result(ModuleState *st, PyObject *result, PyObject *descriptor, PyObject **metadata)
{
    if (!PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 2) {
        PyErr_Format(PyExc_TypeError,
                     "convert of mode '%S' must return (model, metadata), got %.200s%s", descriptor,
                     Py_TYPE(result)->tp_name, PyTuple_Check(result) ? " of the wrong length" : "");
        return NULL;
    }
    PyObject *model = PyTuple_GET_ITEM(result, 0);
    *metadata = PyTuple_GET_ITEM(result, 1);
    int is_module = PyObject_IsInstance(model, st->nn_Module);
    if (is_module < 0) {
        return NULL;
    }
    if (!is_module) {
        PyErr_Format(PyExc_TypeError,
                     "convert of mode '%S' returned %.200s as the model; it must return (model, metadata) "
                     "with an nn.Module",
                     descriptor, Py_TYPE(model)->tp_name);
        return NULL;
    }
    if (!PyDict_Check(*metadata)) {
        PyErr_Format(PyExc_TypeError, "convert of mode '%S' returned metadata of type %.200s; it must be a dict",
                     descriptor, Py_TYPE(*metadata)->tp_name);
        return NULL;
    }
    return Py_NewRef(model);
}

PyDoc_STRVAR(apply_mode_doc,
"apply_mode($module, /, model, mode, registry=None, init_state=None, mode_kwargs=None)\n--\n\n"
"Apply modes to a model, record them in its modelopt state, and return the model.\n\n"
"model: an nn.Module, a model class or callable, or (cls,), (cls, args), (cls, args, kwargs).\n"
"mode: a name, a ModeDescriptor, a (name, config) pair, or a list of these.\n"
"registry: look modes up there only (default: every registry).\n"
"init_state: create fresh state (default: when the model has none).\n"
"mode_kwargs: a dict for every mode, or one dict per mode, passed to convert and\n"
"    never stored.\n\n"
"Every mode and config is checked before the model is touched: an unknown mode\n"
"(KeyError) or an invalid config (pydantic ValidationError) changes nothing.");

/* Resolve every mode of the user's `mode` argument and validate every config, before
 * the model is touched: *descriptors, *configs (new lists) and *kwargs_list (one dict
 * per mode).  0, or -1 with nothing set. */
static int
resolve_modes(ModuleState *st, PyObject *mode, PyObject *registry, PyObject *mode_kwargs, PyObject **descriptors,
              PyObject **configs, PyObject **kwargs_list)
{
    PyObject *modes = NULL, *descs = NULL, *confs = NULL, *kwl = NULL, *descriptor = NULL, *config = NULL;
    int result = -1;

    if ((modes = runtime_call(st, CB_GET_MODE_CONFIG, &mode, 1)) == NULL) {
        goto done;
    }
    if (!PyList_Check(modes)) {
        PyErr_Format(PyExc_TypeError, "get_mode_config returned a %.200s, not a list", Py_TYPE(modes)->tp_name);
        goto done;
    }
    Py_ssize_t n = PyList_GET_SIZE(modes);
    if ((kwl = per_mode_kwargs(mode_kwargs, n)) == NULL || (descs = PyList_New(n)) == NULL ||
        (confs = PyList_New(n)) == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyList_GET_ITEM(modes, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_Format(PyExc_TypeError, "get_mode_config entry %zd is a %.200s, not a (mode, config) pair", i,
                         Py_TYPE(pair)->tp_name);
            goto done;
        }
        PyObject *m = PyTuple_GET_ITEM(pair, 0);
        descriptor = registry != Py_None ? PyObject_GetItem(registry, m) : sm_descriptor(st, m);
        if (descriptor == NULL || (config = sm_config_object(st, descriptor, PyTuple_GET_ITEM(pair, 1))) == NULL) {
            goto done;
        }
        PyList_SET_ITEM(descs, i, descriptor);
        PyList_SET_ITEM(confs, i, config);
        descriptor = config = NULL;
    }
    *descriptors = Py_NewRef(descs);
    *configs = Py_NewRef(confs);
    *kwargs_list = Py_NewRef(kwl);
    result = 0;
done:
    Py_XDECREF(modes);
    Py_XDECREF(descs);
    Py_XDECREF(confs);
    Py_XDECREF(kwl);
    Py_XDECREF(descriptor);
    Py_XDECREF(config);
    return result;
}

/* Run each mode's convert on `model` (a new reference, stolen) and record it in `sm`;
 * the converted model (new reference) or NULL.  *converted_any says whether a convert
 * ran (then the state is the modes' to keep, even on failure). */
static PyObject *
convert_modes(ModuleState *st, StateManager *sm, PyObject *model, PyObject *descriptors, PyObject *configs,
              PyObject *kwargs_list, int *converted_any)
{
    PyObject *convert = NULL, *call_args = NULL, *res = NULL, *result = NULL;

    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(descriptors); i++) {
        PyObject *d = PyList_GET_ITEM(descriptors, i), *mode_config = PyList_GET_ITEM(configs, i), *metadata;
        /* each mode gets what it declares: the recipe holder, or the built model */
        PyObject *prepared = NULL;
        PyObject *prep_args[2] = {model, d};
        if ((prepared = runtime_call(st, CB_PREPARE_MODEL_FOR, prep_args, 2)) == NULL) {
            goto done;
        }
        Py_SETREF(model, prepared);
        if (sm_check_mode(st, sm, d) < 0 || (convert = PyObject_GetAttr(d, st->s_convert)) == NULL ||
            (call_args = PyTuple_Pack(2, model, mode_config)) == NULL) {
            goto done;
        }
        *converted_any = 1;
        if ((res = PyObject_Call(convert, call_args, PyList_GET_ITEM(kwargs_list, i))) == NULL) {
            goto done;
        }
        PyObject *new_model = unpack_convert_result(st, res, d, &metadata);
        if (new_model == NULL) {
            goto done;
        }
        Py_SETREF(model, new_model);
        if (sm_add_mode(st, sm, d, mode_config, metadata) < 0) {
            goto done;
        }
        Py_CLEAR(convert);
        Py_CLEAR(call_args);
        Py_CLEAR(res);
    }
    result = Py_NewRef(model);
done:
    Py_XDECREF(model);
    Py_XDECREF(convert);
    Py_XDECREF(call_args);
    Py_XDECREF(res);
    return result;
}

/* New reference: the model a finished apply/restore returns.  With no mode recorded, a
 * holder is built; a holder left over is an error (SPEC §6). */
static PyObject *
finish_model(ModuleState *st, StateManager *sm, PyObject *model)
{
    PyObject *built = NULL;
    if (PyList_GET_SIZE(sm->state) == 0) {
        built = init_if_model_like(st, model);
    }
    else {
        built = Py_NewRef(model);
    }
    if (built != NULL && ensure_not_model_like(st, built) < 0) {
        Py_CLEAR(built);
    }
    return built;
}

static PyObject *
conversion_apply_mode(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"model", "mode", "registry", "init_state", "mode_kwargs", NULL};
    PyObject *model_arg, *mode, *registry = Py_None, *init_state = Py_None, *mode_kwargs = Py_None;
    PyObject *model = NULL, *unwrapped = NULL, *descriptors = NULL, *configs = NULL, *kwargs_list = NULL,
             *converted = NULL, *result = NULL;
    StateManager *sm = NULL;
    int init = 0, converted_any = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|OOO:apply_mode", kwlist, &model_arg, &mode, &registry,
                                     &init_state, &mode_kwargs)) {
        return NULL;
    }
    ModuleState *st = module_state(module);
    if ((model = as_module(st, model_arg)) == NULL) {
        goto done;
    }
    int no_mode = PyObject_Not(mode);
    if (no_mode != 0) {
        result = no_mode < 0 ? NULL : init_if_model_like(st, model);
        goto done;
    }
    if ((unwrapped = unwrap(st, model, "force")) == NULL ||
        resolve_modes(st, mode, registry, mode_kwargs, &descriptors, &configs, &kwargs_list) < 0) {
        goto done;
    }
    if (init_state == Py_None) {
        /* one walk: is_root=1 raises what the reference's second walk (the manager's) raises */
        int is_converted = sm_is_converted(st, unwrapped, 1);
        if (is_converted < 0) {
            goto done;
        }
        init = !is_converted;
        sm = is_converted ? sm_of_root(st, unwrapped) : sm_new_fresh(st, unwrapped);
    }
    else if ((init = PyObject_IsTrue(init_state)) < 0) {
        init = 0;
        goto done;
    }
    else {
        sm = sm_new(st, unwrapped, init);
    }
    if (sm == NULL) {
        init = 0; /* nothing was created */
        goto done;
    }
    if (sm_update_last(st, sm, unwrapped, st->s_update_for_new_mode) < 0 ||
        (converted = convert_modes(st, sm, Py_NewRef(unwrapped), descriptors, configs, kwargs_list,
                                   &converted_any)) == NULL) {
        goto done;
    }
    result = finish_model(st, sm, converted);
done:
    if (result == NULL && init && !converted_any && sm != NULL) {
        sm_drop_state(st, unwrapped); /* the state this call created */
    }
    Py_XDECREF(model);
    Py_XDECREF(unwrapped);
    Py_XDECREF(descriptors);
    Py_XDECREF(configs);
    Py_XDECREF(kwargs_list);
    Py_XDECREF(converted);
    Py_XDECREF(sm);
    return result;
}

PyObject *
conversion_modelopt_state_impl(ModuleState *st, PyObject *model_arg)
{
    PyObject *model = NULL, *kept = NULL, *version = NULL, *descriptor = NULL, *flag = NULL, *result = NULL;
    StateManager *sm = NULL;

    if ((model = unwrap(st, model_arg, "force")) == NULL) {
        goto done;
    }
    /* one walk: is_root=1 raises what the reference's second check (the manager's) raises */
    int converted = sm_is_converted(st, model, 1);
    if (converted < 0 || (sm = converted ? sm_of_root(st, model) : sm_new(st, NULL, 0)) == NULL ||
        sm_update_last(st, sm, model, st->s_update_for_save) < 0 || (kept = PyList_New(0)) == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(sm->state); i++) {
        PyObject *entry = PyList_GET_ITEM(sm->state, i);
        if (!PyTuple_Check(entry) && !PyList_Check(entry)) {
            PyErr_Format(PyExc_ValueError, "modelopt state entry %zd is a %.200s, not a (mode, state) pair", i,
                         Py_TYPE(entry)->tp_name);
            goto done;
        }
        if ((descriptor = sm_descriptor(st, PySequence_Fast_GET_ITEM(entry, 0))) == NULL ||
            (flag = PyObject_GetAttr(descriptor, st->s_save_mode_in_state)) == NULL) {
            goto done;
        }
        int keep = PyObject_IsTrue(flag);
        if (keep < 0 || (keep && PyList_Append(kept, entry) < 0)) {
            goto done;
        }
        Py_CLEAR(descriptor);
        Py_CLEAR(flag);
    }
    if ((version = runtime_call(st, CB_STATE_VERSION, NULL, 0)) == NULL ||
        (result = PyDict_New()) == NULL || PyDict_SetItem(result, st->s_modelopt_state_dict, kept) < 0 ||
        PyDict_SetItem(result, st->s_modelopt_version, version) < 0) {
        Py_CLEAR(result);
    }
done:
    Py_XDECREF(model);
    Py_XDECREF(kept);
    Py_XDECREF(version);
    Py_XDECREF(descriptor);
    Py_XDECREF(flag);
    Py_XDECREF(sm);
    return result;
}

PyDoc_STRVAR(modelopt_state_doc,
"modelopt_state($module, /, model)\n--\n\n"
"Returns {'modelopt_state_dict': [(mode, {'config', 'metadata'}), ...], 'modelopt_version': str}:\n"
"the modes applied to `model` (no weights).  Runs the last mode's update_for_save and\n"
"leaves out modes whose save_mode_in_state is false.  An unconverted model gives [].");

static PyObject *
conversion_modelopt_state(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *model = args_one("modelopt_state", "model", args, nargs, kwnames);
    return model == NULL ? NULL : conversion_modelopt_state_impl(module_state(module), model);
}

PyDoc_STRVAR(get_mode_doc, "get_mode($module, /, model)\n--\n\nThe last mode (a ModeDescriptor) applied to `model`, or None.");

static PyObject *
conversion_get_mode(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *model = args_one("get_mode", "model", args, nargs, kwnames);
    if (model == NULL) {
        return NULL;
    }
    ModuleState *st = module_state(module);
    int converted = sm_is_converted(st, model, 1); /* and the manager's root check: one walk */
    if (converted <= 0) {
        return converted < 0 ? NULL : Py_NewRef(Py_None);
    }
    StateManager *sm = sm_of_root(st, model);
    if (sm == NULL) {
        return NULL;
    }
    PyObject *result = Py_NewRef(Py_None);
    Py_ssize_t n = PyList_GET_SIZE(sm->state);
    if (n > 0) {
        PyObject *entry = PyList_GET_ITEM(sm->state, n - 1);
        Py_SETREF(result, (PyTuple_Check(entry) || PyList_Check(entry)) && PySequence_Fast_GET_SIZE(entry) == 2
                              ? sm_descriptor(st, PySequence_Fast_GET_ITEM(entry, 0))
                              : (PyErr_Format(PyExc_ValueError, "modelopt state entry %zd is malformed", n - 1), NULL));
    }
    Py_DECREF(sm);
    return result;
}

/* The layout checks of a modelopt state dict, naming what is wrong. */
static int
check_state_layout(ModuleState *st, PyObject *state)
{
    if (!PyDict_Check(state)) {
        PyErr_Format(PyExc_TypeError,
                     "modelopt_state must be the dict returned by modelopt_state(model), got %.200s",
                     Py_TYPE(state)->tp_name);
        return -1;
    }
    PyObject *keys[2] = {st->s_modelopt_state_dict, st->s_modelopt_version};
    for (int k = 0; k < 2; k++) {
        int has = PyDict_Contains(state, keys[k]);
        if (has <= 0) {
            if (has == 0) {
                PyObject *inner = PyDict_GetItemWithError(state, st->s_modelopt_state);
                PyErr_Format(PyExc_KeyError, "modelopt_state has no '%U' key%s", keys[k],
                             inner != NULL ? " (this is a full checkpoint: pass checkpoint['modelopt_state'])"
                                           : "; expected the dict returned by modelopt_state(model)");
            }
            return -1;
        }
    }
    return 0;
}

/* ---- transactional restore -------------------------------------------------------
 * Before a restore replays anything, every module of the model (each once) is recorded:
 * its class, a shallow copy of its __dict__, and a shallow copy of every non-empty
 * dict/list/set in that __dict__ (_modules, _parameters, _buffers, hook dicts,
 * _modelopt_state, ...).  A failed restore puts all of it back; the containers that
 * were empty are found again through the saved __dicts__ and emptied.  O(modules)
 * small copies, no tensor data.  Not undone: tensor data changed in place and state
 * outside the model's modules (globals, objects only referenced from the modules). */

static int
is_container(PyObject *v)
{
    return PyDict_Check(v) || PyList_Check(v) || PyAnySet_Check(v);
}

static Py_ssize_t
container_size(PyObject *v)
{
    return PyDict_Check(v) ? PyDict_GET_SIZE(v) : PyList_Check(v) ? PyList_GET_SIZE(v) : PySet_GET_SIZE(v);
}

/* A shallow copy of a container's items (exact types copied natively; subclasses such
 * as OrderedDict through their own copy(), which keeps their order). */
static PyObject *
container_copy(PyObject *v)
{
    if (PyDict_CheckExact(v)) {
        return PyDict_Copy(v);
    }
    if (PyList_CheckExact(v)) {
        return PyList_GetSlice(v, 0, PyList_GET_SIZE(v));
    }
    if (PySet_CheckExact(v)) {
        return PySet_New(v);
    }
    return PyObject_CallMethod(v, "copy", NULL);
}

static int
container_clear(PyObject *v)
{
    if (PyDict_CheckExact(v)) {
        PyDict_Clear(v);
        return 0;
    }
    if (PyList_Check(v)) {
        return PyList_SetSlice(v, 0, PyList_GET_SIZE(v), NULL);
    }
    if (PySet_CheckExact(v)) {
        return PySet_Clear(v);
    }
    PyObject *res = PyObject_CallMethod(v, "clear", NULL);
    Py_XDECREF(res);
    return res == NULL ? -1 : 0;
}

static int
container_refill(PyObject *v, PyObject *items)
{
    if (PyList_Check(v)) {
        return PyList_SetSlice(v, 0, PyList_GET_SIZE(v), items);
    }
    if (container_clear(v) < 0) {
        return -1;
    }
    if (PyDict_CheckExact(v)) {
        return PyDict_Update(v, items);
    }
    PyObject *res = PyObject_CallMethod(v, "update", "O", items);
    Py_XDECREF(res);
    return res == NULL ? -1 : 0;
}

static void
untrack(PyObject *obj)
{
    if (PyObject_IS_GC(obj) && PyObject_GC_IsTracked(obj)) {
        PyObject_GC_UnTrack(obj);
    }
}

/* (modules, filled): modules is [module, class, dict copy, ...], filled is
 * [container, items copy, ...].  New reference or NULL. */
static PyObject *
snapshot_modules(ModuleState *st, PyObject *model)
{
    PyObject *modules = PyList_New(0), *filled = PyList_New(0), *seen = PySet_New(NULL),
             *stack = PyList_New(0), *module = NULL, *dict = NULL, *saved = NULL, *copy = NULL, *result = NULL;

    /* Tens of thousands of small copies: they are kept out of the cyclic collector, whose
     * passes (a full one, once they had survived to the old generation) would cost more
     * than the copies.  Safe: they reference only objects the model keeps alive, and
     * nothing but this snapshot references them, so their refcounts free them. */
    int gc_was_enabled = PyGC_Disable();
    if (modules == NULL || filled == NULL || seen == NULL || stack == NULL || PyList_Append(stack, model) < 0) {
        goto done;
    }
    while (PyList_GET_SIZE(stack) > 0) {
        Py_ssize_t top = PyList_GET_SIZE(stack) - 1;
        module = Py_NewRef(PyList_GET_ITEM(stack, top));
        if (PyList_SetSlice(stack, top, top + 1, NULL) < 0) {
            goto done;
        }
        int known = PySet_Contains(seen, module);
        if (known < 0 || (!known && PySet_Add(seen, module) < 0)) {
            goto done;
        }
        if (known) {
            Py_CLEAR(module);
            continue;
        }
        if ((dict = PyObject_GenericGetDict(module, NULL)) == NULL) {
            goto done;
        }
        if (!PyDict_Check(dict)) {
            PyErr_Format(PyExc_TypeError, "the __dict__ of a %.200s module is a %.200s", Py_TYPE(module)->tp_name,
                         Py_TYPE(dict)->tp_name);
            goto done;
        }
        if ((saved = PyDict_Copy(dict)) == NULL || (untrack(saved), PyList_Append(modules, module) < 0) ||
            PyList_Append(modules, (PyObject *)Py_TYPE(module)) < 0 || PyList_Append(modules, saved) < 0) {
            goto done;
        }
        /* iterate our own copy: a container subclass's copy() may run code that edits __dict__ */
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(saved, &pos, &key, &value)) {
            if (!is_container(value) || container_size(value) == 0) {
                continue;
            }
            if ((copy = container_copy(value)) == NULL || (untrack(copy), PyList_Append(filled, value) < 0) ||
                PyList_Append(filled, copy) < 0) {
                goto done;
            }
            Py_CLEAR(copy);
        }
        Py_CLEAR(saved);
        PyObject *children = PyDict_GetItemWithError(dict, st->s_modules); /* borrowed */
        if (children == NULL && PyErr_Occurred()) {
            goto done;
        }
        if (children != NULL && PyDict_Check(children)) {
            pos = 0;
            while (PyDict_Next(children, &pos, &key, &value)) {
                if (value != Py_None && PyList_Append(stack, value) < 0) {
                    goto done;
                }
            }
        }
        Py_CLEAR(dict);
        Py_CLEAR(module);
    }
    result = PyTuple_Pack(2, modules, filled);
done:
    if (gc_was_enabled) {
        PyGC_Enable();
    }
    Py_XDECREF(modules);
    Py_XDECREF(filled);
    Py_XDECREF(seen);
    Py_XDECREF(stack);
    Py_XDECREF(module);
    Py_XDECREF(dict);
    Py_XDECREF(saved);
    Py_XDECREF(copy);
    return result;
}

static int
rollback_snapshot(PyObject *snapshot)
{
    PyObject *modules = PyTuple_GET_ITEM(snapshot, 0), *filled = PyTuple_GET_ITEM(snapshot, 1);
    PyObject *had_items = PySet_New(NULL), *id = NULL, *dict = NULL;
    int result = -1;

    if (had_items == NULL) {
        return -1;
    }
    for (Py_ssize_t i = 0; i + 1 < PyList_GET_SIZE(filled); i += 2) {
        PyObject *container = PyList_GET_ITEM(filled, i);
        if ((id = PyLong_FromVoidPtr(container)) == NULL || PySet_Add(had_items, id) < 0 ||
            container_refill(container, PyList_GET_ITEM(filled, i + 1)) < 0) {
            goto done;
        }
        Py_CLEAR(id);
    }
    for (Py_ssize_t i = 0; i + 2 < PyList_GET_SIZE(modules); i += 3) {
        PyObject *module = PyList_GET_ITEM(modules, i), *cls = PyList_GET_ITEM(modules, i + 1),
                 *saved = PyList_GET_ITEM(modules, i + 2);
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(saved, &pos, &key, &value)) {
            if (!is_container(value) || container_size(value) == 0) {
                continue;
            }
            if ((id = PyLong_FromVoidPtr(value)) == NULL) {
                goto done;
            }
            int had = PySet_Contains(had_items, id);
            Py_CLEAR(id);
            if (had < 0 || (!had && container_clear(value) < 0)) { /* empty at the snapshot */
                goto done;
            }
        }
        if ((PyObject *)Py_TYPE(module) != cls && PyObject_SetAttrString(module, "__class__", cls) < 0) {
            goto done;
        }
        if ((dict = PyObject_GenericGetDict(module, NULL)) == NULL) {
            goto done;
        }
        if (PyDict_Check(dict)) {
            PyDict_Clear(dict);
            if (PyDict_Update(dict, saved) < 0) {
                goto done;
            }
        }
        Py_CLEAR(dict);
    }
    result = 0;
done:
    Py_XDECREF(had_items);
    Py_XDECREF(id);
    Py_XDECREF(dict);
    return result;
}

/* Roll back, keeping the exception being raised (a failing rollback is reported as
 * unraisable: the original error is what the caller must see). */
static void
rollback_modules(PyObject *snapshot)
{
    PyObject *exc = PyErr_GetRaisedException();
    if (rollback_snapshot(snapshot) < 0) {
        PyErr_WriteUnraisable(snapshot);
    }
    PyErr_SetRaisedException(exc);
}

/* Call each mode's restore on `model` (a new reference, stolen), in the order of
 * `modes` (the manager's modes_with_states iterator); the restored model or NULL. */
static PyObject *
restore_modes(ModuleState *st, PyObject *model, PyObject *modes)
{
    PyObject *item = NULL, *restore_fn = NULL, *restored = NULL, *result = NULL;

    while ((item = PyIter_Next(modes)) != NULL) {
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            PyErr_Format(PyExc_TypeError, "modes_with_states gave a %.200s, not (descriptor, config, metadata)",
                         Py_TYPE(item)->tp_name);
            goto done;
        }
        PyObject *descriptor = PyTuple_GET_ITEM(item, 0);
        if ((model = prepare_model_for(st, model, descriptor)) == NULL ||
            (restore_fn = PyObject_GetAttr(descriptor, st->s_restore)) == NULL) {
            goto done;
        }
        PyObject *call[3] = {model, PyTuple_GET_ITEM(item, 1), PyTuple_GET_ITEM(item, 2)};
        if ((restored = PyObject_Vectorcall(restore_fn, call, 3, NULL)) == NULL) {
            goto done;
        }
        int is_module = PyObject_IsInstance(restored, st->nn_Module);
        if (is_module <= 0) {
            if (is_module == 0) {
                PyErr_Format(PyExc_TypeError, "restore of mode '%S' returned %.200s; it must return the nn.Module",
                             descriptor, Py_TYPE(restored)->tp_name);
            }
            goto done;
        }
        Py_SETREF(model, restored);
        restored = NULL;
        Py_CLEAR(restore_fn);
        Py_CLEAR(item);
    }
    if (!PyErr_Occurred()) {
        result = Py_NewRef(model);
    }
done:
    Py_XDECREF(model);
    Py_XDECREF(item);
    Py_XDECREF(restore_fn);
    Py_XDECREF(restored);
    return result;
}

/* Replay the modes of `state` on `model_arg` and, when `weights` is given, load them
 * (checked first).  Transactional: on any failure every module of the model gets back
 * its class, attributes, submodules, parameters, buffers, hooks and modelopt state. */
static PyObject *
restore_from_state_impl(ModuleState *st, PyObject *model_arg, PyObject *state, PyObject *weights,
                        PyObject *source, PyObject *progress)
{
    PyObject *model = NULL, *snapshot = NULL, *entries = NULL, *version = NULL, *modes = NULL,
             *restored = NULL, *built = NULL, *result = NULL;
    StateManager *sm = NULL;

    int truthy = PyObject_IsTrue(state);
    if (truthy <= 0) {
        if (truthy == 0) {
            PyErr_SetString(PyExc_AssertionError, "modelopt_state is required!");
        }
        return NULL;
    }
    if (check_state_layout(st, state) < 0) {
        return NULL;
    }
    if ((model = as_module(st, model_arg)) == NULL ||
        (snapshot = snapshot_modules(st, model)) == NULL ||
        (entries = PyObject_GetItem(state, st->s_modelopt_state_dict)) == NULL ||
        (version = PyObject_GetItem(state, st->s_modelopt_version)) == NULL ||
        (sm = sm_new(st, model, 1)) == NULL || sm_load_state_dict(st, sm, entries, version) < 0 ||
        (modes = PyObject_CallMethod((PyObject *)sm, "modes_with_states", NULL)) == NULL) {
        goto done;
    }
    if ((restored = restore_modes(st, Py_NewRef(model), modes)) == NULL ||
        (built = finish_model(st, sm, restored)) == NULL) {
        goto done;
    }
    Py_SETREF(model, Py_NewRef(built));
    if (weights != NULL && ckpt_load_weights(st, model, weights, source, progress) < 0) {
        goto done;
    }
    result = Py_NewRef(model);
done:
    if (result == NULL && snapshot != NULL) {
        rollback_modules(snapshot);
    }
    Py_XDECREF(built);
    Py_XDECREF(model);
    Py_XDECREF(snapshot);
    Py_XDECREF(entries);
    Py_XDECREF(version);
    Py_XDECREF(modes);
    Py_XDECREF(restored);
    Py_XDECREF(sm);
    return result;
}

PyDoc_STRVAR(restore_from_state_doc,
"_restore_from_state($module, /, model, modelopt_state, weights=None, source=None, *, progress=None)\n--\n\n"
"The native half of restore() and restore_from_modelopt_state() (modelopt_c.checkpoint):\n"
"replay the modes of `modelopt_state` on `model` and, when `weights` is given, copy them\n"
"into the model's own tensors (checked first; `source` is the file's name for messages).\n"
"One transaction: on any failure every module of the model gets back its class,\n"
"attributes, submodules, parameters, buffers, hooks and modelopt state.\n"
"`progress(done_bytes, total_bytes)` is called after each tensor is loaded.");

static PyObject *
conversion_restore_from_state(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"model", "modelopt_state", "weights", "source", "progress", NULL};
    PyObject *model, *state, *weights = Py_None, *source = Py_None, *progress = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|OO$O:_restore_from_state", kwlist, &model, &state, &weights,
                                     &source, &progress)) {
        return NULL;
    }
    if (progress != Py_None && !PyCallable_Check(progress)) {
        PyErr_Format(PyExc_TypeError, "_restore_from_state: progress must be callable or None, not %.200s",
                     Py_TYPE(progress)->tp_name);
        return NULL;
    }
    return restore_from_state_impl(module_state(module), model, state, weights == Py_None ? NULL : weights, source,
                                   progress == Py_None ? NULL : progress);
}

PyDoc_STRVAR(save_torch_file_doc,
"_save_torch_file($module, path, obj, /, **torch_save_kwargs)\n--\n\n"
"torch.save(obj, path, **torch_save_kwargs) through the crash-safe writer (temp file\n"
"locked while written, fsync, rename, fsync the folder; stale temp files of the folder\n"
"removed).  For modelopt_c.checkpoint (save, and the command-line tool's convert).\n"
"`_started` (not passed to torch.save): called with the temp file's path before\n"
"torch.save writes it (progress watches it grow; an exception aborts the save).");

static PyObject *
conversion_save_torch_file(PyObject *module, PyObject *args, PyObject *kwargs)
{
    PyObject *path, *obj;
    if (!PyArg_ParseTuple(args, "OO:_save_torch_file", &path, &obj)) {
        return NULL;
    }
    return ckpt_save_torch_file(module_state(module), path, obj, kwargs);
}

PyMethodDef conversion_methods[] = {
    {"apply_mode", (PyCFunction)(void (*)(void))conversion_apply_mode, METH_VARARGS | METH_KEYWORDS,
     apply_mode_doc},
    {"modelopt_state", (PyCFunction)(void (*)(void))conversion_modelopt_state, METH_FASTCALL | METH_KEYWORDS,
     modelopt_state_doc},
    {"get_mode", (PyCFunction)(void (*)(void))conversion_get_mode, METH_FASTCALL | METH_KEYWORDS, get_mode_doc},
    {"_restore_from_state", (PyCFunction)(void (*)(void))conversion_restore_from_state,
     METH_VARARGS | METH_KEYWORDS, restore_from_state_doc},
    {"_save_torch_file", (PyCFunction)(void (*)(void))conversion_save_torch_file, METH_VARARGS | METH_KEYWORDS,
     save_torch_file_doc},
    {NULL, NULL, 0, NULL},
};
