/* ModeloptStateManager: the record of which modes ran on a model, kept on the root
 * module as `_modelopt_state` / `_modelopt_state_version` (SPEC §2, §5).  Modes and
 * configs stay Python objects; this file does the bookkeeping around them. */
#include "state_manager.h"

#include "args.h"

#include <stdarg.h>
#include <structmember.h>

/* ---- finding the state in a module tree --------------------------------------- */

/* Whether `type` (its MRO's dicts: what hasattr() sees on the class) has the state
 * attribute, without raising AttributeErrors. */
static int
type_has_state(ModuleState *st, PyTypeObject *type)
{
    PyObject *mro = type->tp_mro;
    if (mro == NULL) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(mro); i++) {
        PyObject *base_dict = ((PyTypeObject *)PyTuple_GET_ITEM(mro, i))->tp_dict;
        if (base_dict != NULL) {
            int r = PyDict_Contains(base_dict, st->s_state_key);
            if (r != 0) {
                return r;
            }
        }
    }
    return 0;
}

/* A new reference to the instance __dict__ of `obj`, or NULL without error if none. */
static PyObject *
instance_dict(PyObject *obj)
{
    PyObject *dict = PyObject_GenericGetDict(obj, NULL);
    if (dict == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear(); /* no instance __dict__: the documented "NULL without error" */
    }
    return dict;
}

/* The walk's bookkeeping, in C: tens of thousands of modules per call, so no Python set
 * or list per step.  `seen` is an open-addressing set of module addresses (the walk holds
 * a strong reference to every module on `stack`, and the tree holds the rest, so an
 * address cannot be reused while the walk runs). */
typedef struct {
    PyObject **stack; /* strong references */
    Py_ssize_t depth, stack_cap;
    uintptr_t *seen; /* 0: empty slot */
    size_t seen_mask, seen_used;
} Walk;

static int
walk_push(Walk *w, PyObject *module)
{
    if (w->depth == w->stack_cap) {
        Py_ssize_t cap = w->stack_cap ? w->stack_cap * 2 : 64;
        PyObject **grown = PyMem_Realloc(w->stack, (size_t)cap * sizeof(PyObject *));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        w->stack = grown;
        w->stack_cap = cap;
    }
    w->stack[w->depth++] = Py_NewRef(module);
    return 0;
}

/* 1 when `module` is new to the walk (now recorded), 0 when seen before, -1 on error. */
static int
walk_first_visit(Walk *w, PyObject *module)
{
    if (2 * (w->seen_used + 1) > w->seen_mask + 1) { /* keep the load under 1/2 */
        size_t size = w->seen_mask ? 2 * (w->seen_mask + 1) : 256;
        uintptr_t *table = PyMem_Calloc(size, sizeof(uintptr_t));
        if (table == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (size_t i = 0; w->seen != NULL && i <= w->seen_mask; i++) {
            if (w->seen[i] != 0) {
                size_t j = (size_t)((w->seen[i] >> 4) * 0x9E3779B97F4A7C15ull) & (size - 1);
                while (table[j] != 0) {
                    j = (j + 1) & (size - 1);
                }
                table[j] = w->seen[i];
            }
        }
        PyMem_Free(w->seen);
        w->seen = table;
        w->seen_mask = size - 1;
    }
    uintptr_t key = (uintptr_t)module;
    size_t j = (size_t)((key >> 4) * 0x9E3779B97F4A7C15ull) & w->seen_mask;
    while (w->seen[j] != 0) {
        if (w->seen[j] == key) {
            return 0;
        }
        j = (j + 1) & w->seen_mask;
    }
    w->seen[j] = key;
    w->seen_used++;
    return 1;
}

static void
walk_free(Walk *w)
{
    while (w->depth > 0) {
        Py_DECREF(w->stack[--w->depth]);
    }
    PyMem_Free(w->stack);
    PyMem_Free(w->seen);
}

int
sm_is_converted(ModuleState *st, PyObject *model, int is_root)
{
    PyObject *module = NULL, *dict = NULL, *children = NULL;
    PyTypeObject *last_type = NULL; /* consecutive modules mostly share a class */
    int last_type_has = 0, found = 0, root_has_state = 0, result = -1;
    Walk w = {0};

    int ok = PyObject_IsInstance(model, st->nn_Module);
    if (ok <= 0) {
        if (ok == 0) {
            PyErr_Format(PyExc_TypeError,
                         "expected a torch.nn.Module, got %.200s; build the model first "
                         "(or pass it to apply_mode/restore, which accept model-like recipes)",
                         Py_TYPE(model)->tp_name);
        }
        return -1;
    }
    if (walk_push(&w, model) < 0) {
        goto done;
    }
    /* Depth-first walk of `_modules`, as named_modules() does (each module once). */
    while (w.depth > 0) {
        module = w.stack[--w.depth]; /* the stack's reference, now ours */
        int first = walk_first_visit(&w, module);
        if (first <= 0) {
            if (first < 0) {
                goto done;
            }
            Py_CLEAR(module);
            continue;
        }
        dict = instance_dict(module);
        if (dict == NULL && PyErr_Occurred()) {
            goto done;
        }
        int has = dict != NULL ? PyDict_Contains(dict, st->s_state_key) : 0;
        if (has == 0) {
            if (Py_TYPE(module) != last_type) {
                if ((last_type_has = type_has_state(st, Py_TYPE(module))) < 0) {
                    goto done;
                }
                last_type = Py_TYPE(module);
            }
            has = last_type_has;
        }
        if (has < 0) {
            goto done;
        }
        if (has) {
            if (++found > 1) {
                PyErr_SetString(PyExc_AssertionError, "Model has multiple modelopt states!");
                goto done;
            }
            root_has_state = module == model;
        }
        if (dict != NULL && PyDict_GetItemRef(dict, st->s_modules, &children) < 0) {
            goto done;
        }
        if (children != NULL && PyDict_Check(children)) {
            Py_ssize_t pos = 0;
            PyObject *key, *child;
            while (PyDict_Next(children, &pos, &key, &child)) {
                if (child != Py_None && walk_push(&w, child) < 0) {
                    goto done;
                }
            }
        }
        Py_CLEAR(children);
        Py_CLEAR(dict);
        Py_CLEAR(module);
    }
    if (found && is_root && !root_has_state) {
        PyErr_SetString(PyExc_AssertionError, "Model has modelopt state but not the root!");
        goto done;
    }
    result = found;
done:
    Py_XDECREF(children);
    Py_XDECREF(dict);
    Py_XDECREF(module);
    walk_free(&w);
    return result;
}

/* ---- construction --------------------------------------------------------------- */

static StateManager *
sm_alloc(ModuleState *st, PyTypeObject *type)
{
    (void)st;
    return (StateManager *)type->tp_alloc(type, 0);
}

/* `walk`: check the tree (the root must be the one module with state); 0 only when the
 * caller has just walked it and found no state anywhere, so the fresh root state is the one. */
static int
sm_init(ModuleState *st, StateManager *self, PyObject *model, int init_state, int walk)
{
    PyObject *fake = NULL, *state = NULL, *version_list = NULL, *version = NULL;
    int result = -1;

    int falsy = model == NULL ? 1 : PyObject_Not(model);
    if (falsy < 0) {
        goto done;
    }
    if (falsy) {
        if ((fake = PyObject_CallNoArgs(st->nn_Module)) == NULL) {
            goto done;
        }
        model = fake;
        init_state = 1;
    }
    if (init_state) {
        PyObject *existing = NULL;
        int has = PyObject_GetOptionalAttr(model, st->s_state_key, &existing);
        Py_XDECREF(existing);
        if (has < 0) {
            goto done;
        }
        if (has) {
            PyErr_SetString(PyExc_AssertionError, "Model already has modelopt state!");
            goto done;
        }
        if ((version = runtime_call(st, CB_STATE_VERSION, NULL, 0)) == NULL ||
            (state = PyList_New(0)) == NULL ||
            (version_list = PyList_New(1)) == NULL) {
            goto done;
        }
        PyList_SET_ITEM(version_list, 0, Py_NewRef(version));
        if (PyObject_SetAttr(model, st->s_state_key, state) < 0 ||
            PyObject_SetAttr(model, st->s_version_key, version_list) < 0) {
            goto done;
        }
        Py_CLEAR(state);
        Py_CLEAR(version_list);
    }
    int converted = walk || fake != NULL ? sm_is_converted(st, model, 1) : 1;
    if (converted < 0) {
        goto done;
    }
    if (!converted) {
        PyErr_SetString(PyExc_AssertionError, "Model must have modelopt state!");
        goto done;
    }
    if ((state = PyObject_GetAttr(model, st->s_state_key)) == NULL ||
        (version_list = PyObject_GetAttr(model, st->s_version_key)) == NULL) {
        goto done;
    }
    Py_XSETREF(self->state, state);
    Py_XSETREF(self->version, version_list);
    state = version_list = NULL;
    result = 0;
done:
    Py_XDECREF(fake);
    Py_XDECREF(state);
    Py_XDECREF(version_list);
    Py_XDECREF(version);
    return result;
}

StateManager *
sm_new_fresh(ModuleState *st, PyObject *model)
{
    StateManager *self = sm_alloc(st, st->StateManagerType);
    if (self != NULL && sm_init(st, self, model, 1, 0) < 0) {
        Py_CLEAR(self);
    }
    return self;
}

StateManager *
sm_of_root(ModuleState *st, PyObject *model)
{
    StateManager *self = NULL;
    int falsy = PyObject_Not(model);
    if (falsy != 0) { /* a falsy model gets a fresh module, as the constructor does */
        return falsy < 0 ? NULL : sm_new(st, model, 0);
    }
    if ((self = sm_alloc(st, st->StateManagerType)) == NULL) {
        return NULL;
    }
    if ((self->state = PyObject_GetAttr(model, st->s_state_key)) == NULL ||
        (self->version = PyObject_GetAttr(model, st->s_version_key)) == NULL) {
        Py_CLEAR(self);
    }
    return self;
}

StateManager *
sm_new(ModuleState *st, PyObject *model, int init_state)
{
    StateManager *self = sm_alloc(st, st->StateManagerType);
    if (self == NULL) {
        return NULL;
    }
    if (sm_init(st, self, model, init_state, 1) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return self;
}

static PyObject *
sm_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"model", "init_state", NULL};
    PyObject *model = Py_None;
    int init_state = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|Op:ModeloptStateManager", kwlist, &model,
                                     &init_state)) {
        return NULL;
    }
    ModuleState *st = module_state_from_type(type);
    if (st == NULL) {
        return NULL;
    }
    StateManager *self = sm_alloc(st, type);
    if (self == NULL) {
        return NULL;
    }
    if (sm_init(st, self, model == Py_None ? NULL : model, init_state, 1) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
sm_traverse(StateManager *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->state);
    Py_VISIT(self->version);
    return 0;
}

static int
sm_clear(StateManager *self)
{
    Py_CLEAR(self->state);
    Py_CLEAR(self->version);
    return 0;
}

static void
sm_dealloc(StateManager *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    (void)sm_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* ---- descriptors and configs ---------------------------------------------------- */

PyObject *
sm_descriptor(ModuleState *st, PyObject *mode)
{
    return runtime_call(st, CB_GET_FROM_ANY, &mode, 1);
}

PyObject *
sm_config_object(ModuleState *st, PyObject *mode, PyObject *config)
{
    PyObject *descriptor = NULL, *cls = NULL, *kwargs = NULL, *empty = NULL, *result = NULL;

    if ((descriptor = sm_descriptor(st, mode)) == NULL ||
        (cls = PyObject_GetAttr(descriptor, st->s_config_class)) == NULL) {
        goto done;
    }
    if (config == Py_None) {
        kwargs = PyDict_New();
    }
    else if (PyDict_Check(config)) {
        kwargs = Py_NewRef(config);
    }
    else if ((kwargs = PyDict_New()) != NULL && PyDict_Merge(kwargs, config, 1) < 0) {
        Py_CLEAR(kwargs);
        PyErr_Format(PyExc_TypeError, "the config of mode '%S' must be a mapping, got %.200s",
                     descriptor, Py_TYPE(config)->tp_name);
        goto done;
    }
    if (kwargs == NULL || (empty = PyTuple_New(0)) == NULL) {
        goto done;
    }
    result = PyObject_Call(cls, empty, kwargs);
    if (result == NULL) {
        err_add_note("while validating the config of mode '%S' (%S)", descriptor, cls);
    }
done:
    Py_XDECREF(descriptor);
    Py_XDECREF(cls);
    Py_XDECREF(kwargs);
    Py_XDECREF(empty);
    return result;
}

/* Borrowed (name, mode_state) of entry `i`, validated; sets an error naming the entry. */
static int
sm_entry(ModuleState *st, PyObject *entry, Py_ssize_t i, PyObject **name, PyObject **mstate)
{
    if (!(PyTuple_Check(entry) || PyList_Check(entry)) || PySequence_Fast_GET_SIZE(entry) != 2) {
        PyErr_Format(PyExc_ValueError,
                     "modelopt state entry %zd: expected a (mode_name, {'config': ..., "
                     "'metadata': ...}) pair, got %.200s",
                     i, Py_TYPE(entry)->tp_name);
        return -1;
    }
    *name = PySequence_Fast_GET_ITEM(entry, 0);
    *mstate = PySequence_Fast_GET_ITEM(entry, 1);
    if (!PyUnicode_Check(*name)) {
        PyErr_Format(PyExc_TypeError, "modelopt state entry %zd: the mode name must be a str, got %.200s",
                     i, Py_TYPE(*name)->tp_name);
        return -1;
    }
    if (!PyDict_Check(*mstate)) {
        PyErr_Format(PyExc_TypeError,
                     "modelopt state entry %zd (mode '%U'): expected a dict with 'config' and "
                     "'metadata', got %.200s",
                     i, *name, Py_TYPE(*mstate)->tp_name);
        return -1;
    }
    PyObject *keys[2] = {st->s_config, st->s_metadata};
    for (int k = 0; k < 2; k++) {
        int has = PyDict_Contains(*mstate, keys[k]);
        if (has <= 0) {
            if (has == 0) {
                PyErr_Format(PyExc_KeyError, "modelopt state entry %zd (mode '%U') has no '%U'", i, *name,
                             keys[k]);
            }
            return -1;
        }
    }
    return 0;
}

/* Borrowed name and mode state of the last entry; 0 when the state is empty. */
static int
sm_last_entry(ModuleState *st, StateManager *sm, PyObject **name, PyObject **mstate)
{
    Py_ssize_t n = PyList_GET_SIZE(sm->state);
    if (n == 0) {
        return 0;
    }
    return sm_entry(st, PyList_GET_ITEM(sm->state, n - 1), n - 1, name, mstate) < 0 ? -1 : 1;
}

/* ---- the export stack and the next-mode rules ------------------------------------ */

/* New list of (mode, export_mode) str pairs still waiting for their export mode. */
static PyObject *
sm_export_stack(ModuleState *st, StateManager *sm)
{
    PyObject *stack = PyList_New(0), *descriptor = NULL, *export_mode = NULL, *is_export = NULL,
             *name = NULL, *pair = NULL, *result = NULL;
    if (stack == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(sm->state); i++) {
        PyObject *entry_name, *mstate;
        if (sm_entry(st, PyList_GET_ITEM(sm->state, i), i, &entry_name, &mstate) < 0 ||
            (descriptor = sm_descriptor(st, entry_name)) == NULL ||
            (export_mode = PyObject_GetAttr(descriptor, st->s_export_mode)) == NULL ||
            (name = PyObject_Str(descriptor)) == NULL) {
            goto done;
        }
        if (export_mode != Py_None) {
            if ((pair = PyTuple_Pack(2, name, export_mode)) == NULL || PyList_Append(stack, pair) < 0) {
                goto done;
            }
            Py_CLEAR(pair);
        }
        else {
            if ((is_export = PyObject_GetAttr(descriptor, st->s_is_export_mode)) == NULL) {
                goto done;
            }
            int exporting = PyObject_IsTrue(is_export);
            if (exporting < 0) {
                goto done;
            }
            if (exporting) {
                Py_ssize_t n = PyList_GET_SIZE(stack);
                int match = n > 0 ? PyObject_RichCompareBool(
                                        name, PyTuple_GET_ITEM(PyList_GET_ITEM(stack, n - 1), 1), Py_EQ)
                                  : 0;
                if (match < 0) {
                    goto done;
                }
                if (!match) {
                    PyErr_SetString(PyExc_AssertionError, "Inconsistent export stack!");
                    goto done;
                }
                if (PyList_SetSlice(stack, n - 1, n, NULL) < 0) {
                    goto done;
                }
            }
            Py_CLEAR(is_export);
        }
        Py_CLEAR(descriptor);
        Py_CLEAR(export_mode);
        Py_CLEAR(name);
    }
    result = Py_NewRef(stack);
done:
    Py_XDECREF(stack);
    Py_XDECREF(descriptor);
    Py_XDECREF(export_mode);
    Py_XDECREF(is_export);
    Py_XDECREF(name);
    Py_XDECREF(pair);
    return result;
}

static int
assert_next_mode(PyObject *descriptor, PyObject *previous)
{
    PyObject *res = PyObject_CallMethod(descriptor, "assert_compatibility_as_next_mode_of", "O", previous);
    Py_XDECREF(res);
    return res == NULL ? -1 : 0;
}

int
sm_check_mode(ModuleState *st, StateManager *sm, PyObject *mode)
{
    PyObject *descriptor = NULL, *stack = NULL, *is_export = NULL, *name = NULL, *shown = NULL,
             *last = NULL, *top = NULL;
    int result = -1;

    if ((descriptor = sm_descriptor(st, mode)) == NULL || (stack = sm_export_stack(st, sm)) == NULL ||
        (is_export = PyObject_GetAttr(descriptor, st->s_is_export_mode)) == NULL ||
        (name = PyObject_Str(descriptor)) == NULL) {
        goto done;
    }
    Py_ssize_t depth = PyList_GET_SIZE(stack);
    int exporting = PyObject_IsTrue(is_export);
    if (exporting < 0) {
        goto done;
    }
    if (exporting) {
        int match = depth > 0 ? PyObject_RichCompareBool(
                                    name, PyTuple_GET_ITEM(PyList_GET_ITEM(stack, depth - 1), 1), Py_EQ)
                              : 0;
        if (match < 0) {
            goto done;
        }
        if (!match) {
            if ((shown = PyObject_CallOneArg(st->deque, stack)) != NULL) {
                PyErr_Format(PyExc_AssertionError, "Cannot add %U according to the current export stack: %S.",
                             name, shown);
            }
            goto done;
        }
    }
    PyObject *last_name, *last_state;
    int has_last = sm_last_entry(st, sm, &last_name, &last_state);
    if (has_last < 0) {
        goto done;
    }
    if (has_last) {
        if ((last = sm_descriptor(st, last_name)) == NULL || assert_next_mode(descriptor, last) < 0) {
            goto done;
        }
    }
    if (depth > 0) {
        if ((top = sm_descriptor(st, PyTuple_GET_ITEM(PyList_GET_ITEM(stack, depth - 1), 0))) == NULL ||
            assert_next_mode(descriptor, top) < 0) {
            goto done;
        }
    }
    result = 0;
done:
    Py_XDECREF(descriptor);
    Py_XDECREF(stack);
    Py_XDECREF(is_export);
    Py_XDECREF(name);
    Py_XDECREF(shown);
    Py_XDECREF(last);
    Py_XDECREF(top);
    return result;
}

int
sm_add_mode(ModuleState *st, StateManager *sm, PyObject *mode, PyObject *config, PyObject *metadata)
{
    PyObject *descriptor = NULL, *name = NULL, *dumped = NULL, *mstate = NULL, *entry = NULL;
    int result = -1;

    if ((descriptor = sm_descriptor(st, mode)) == NULL || sm_check_mode(st, sm, descriptor) < 0 ||
        (name = PyObject_Str(descriptor)) == NULL ||
        (dumped = PyObject_CallMethodNoArgs(config, st->s_model_dump)) == NULL ||
        (mstate = PyDict_New()) == NULL || PyDict_SetItem(mstate, st->s_config, dumped) < 0 ||
        PyDict_SetItem(mstate, st->s_metadata, metadata) < 0 ||
        (entry = PyTuple_Pack(2, name, mstate)) == NULL || PyList_Append(sm->state, entry) < 0) {
        goto done;
    }
    result = 0;
done:
    Py_XDECREF(descriptor);
    Py_XDECREF(name);
    Py_XDECREF(dumped);
    Py_XDECREF(mstate);
    Py_XDECREF(entry);
    return result;
}

int
sm_update_last(ModuleState *st, StateManager *sm, PyObject *model, PyObject *entry_point)
{
    PyObject *name, *mstate, *descriptor = NULL, *config = NULL, *fn = NULL, *res = NULL,
                             *dumped = NULL, *cfg_dict = NULL, *metadata = NULL;
    int result = -1;

    int has_last = sm_last_entry(st, sm, &name, &mstate);
    if (has_last <= 0) {
        return has_last;
    }
    Py_INCREF(mstate); /* the entry point may edit the state list */
    if (PyDict_GetItemRef(mstate, st->s_config, &cfg_dict) < 0 ||
        PyDict_GetItemRef(mstate, st->s_metadata, &metadata) < 0 ||
        (descriptor = sm_descriptor(st, name)) == NULL ||
        (config = sm_config_object(st, name, cfg_dict)) == NULL ||
        (fn = PyObject_GetAttr(descriptor, entry_point)) == NULL) {
        goto done;
    }
    PyObject *args[3] = {model, config, metadata};
    if ((res = PyObject_Vectorcall(fn, args, 3, NULL)) == NULL ||
        (dumped = PyObject_CallMethodNoArgs(config, st->s_model_dump)) == NULL ||
        PyDict_SetItem(mstate, st->s_config, dumped) < 0) {
        goto done;
    }
    result = 0;
done:
    Py_DECREF(mstate);
    Py_XDECREF(cfg_dict);
    Py_XDECREF(metadata);
    Py_XDECREF(descriptor);
    Py_XDECREF(config);
    Py_XDECREF(fn);
    Py_XDECREF(res);
    Py_XDECREF(dumped);
    return result;
}

/* Whether two version strings differ in their first two dot-separated parts. */
static int
versions_differ(PyObject *a, PyObject *b)
{
    PyObject *pa = NULL, *pb = NULL, *dot = NULL;
    int result = -1;
    if ((dot = PyUnicode_FromString(".")) == NULL || (pa = PyUnicode_Split(a, dot, 2)) == NULL ||
        (pb = PyUnicode_Split(b, dot, 2)) == NULL) {
        goto done;
    }
    Py_ssize_t na = PyList_GET_SIZE(pa) < 2 ? PyList_GET_SIZE(pa) : 2;
    Py_ssize_t nb = PyList_GET_SIZE(pb) < 2 ? PyList_GET_SIZE(pb) : 2;
    result = na != nb;
    for (Py_ssize_t i = 0; !result && i < na; i++) {
        int eq = PyObject_RichCompareBool(PyList_GET_ITEM(pa, i), PyList_GET_ITEM(pb, i), Py_EQ);
        if (eq < 0) {
            result = -1;
            goto done;
        }
        result = !eq;
    }
done:
    Py_XDECREF(dot);
    Py_XDECREF(pa);
    Py_XDECREF(pb);
    return result;
}

int
sm_load_state_dict(ModuleState *st, StateManager *sm, PyObject *state_dict, PyObject *version)
{
    PyObject *current = NULL, *copy = NULL, *entries = NULL, *config = NULL;
    int result = -1, appended = 0;

    if (PyList_GET_SIZE(sm->state) > 0) {
        PyErr_SetString(PyExc_AssertionError, "Cannot load state_dict if there is already one.");
        return -1;
    }
    if ((current = runtime_call(st, CB_STATE_VERSION, NULL, 0)) == NULL) {
        goto done;
    }
    if (version == NULL || version == Py_None) {
        version = current;
    }
    else if (!PyUnicode_Check(version)) {
        PyErr_Format(PyExc_TypeError, "the modelopt state version must be a str, got %.200s",
                     Py_TYPE(version)->tp_name);
        goto done;
    }
    else {
        int differ = versions_differ(version, current);
        if (differ < 0 ||
            (differ && PyErr_WarnFormat(PyExc_UserWarning, 1,
                                        "The checkpoint is stored with version %U, but current version is "
                                        "%U. Compatibility of checkpoint with current version is not "
                                        "guaranteed!",
                                        version, current) < 0)) {
            goto done;
        }
    }
    if (!PyList_Check(state_dict) && !PyTuple_Check(state_dict)) {
        PyErr_Format(PyExc_TypeError, "the modelopt state must be a list of (mode_name, mode_state) pairs, got %.200s",
                     Py_TYPE(state_dict)->tp_name);
        goto done;
    }
    if ((copy = PyObject_CallOneArg(st->deepcopy, state_dict)) == NULL ||
        (entries = PySequence_List(copy)) == NULL) {
        goto done;
    }
    appended = 1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(entries); i++) {
        PyObject *name, *mstate;
        if (sm_entry(st, PyList_GET_ITEM(entries, i), i, &name, &mstate) < 0) {
            goto done;
        }
        PyObject *cfg = PyDict_GetItemWithError(mstate, st->s_config);
        PyObject *metadata = cfg ? PyDict_GetItemWithError(mstate, st->s_metadata) : NULL;
        if (metadata == NULL) {
            goto done;
        }
        if ((config = sm_config_object(st, name, cfg)) == NULL) {
            err_add_note("in modelopt state entry %zd", i);
            goto done;
        }
        if (sm_add_mode(st, sm, name, config, metadata) < 0) {
            err_add_note("in modelopt state entry %zd", i);
            goto done;
        }
        Py_CLEAR(config);
    }
    /* the state is then exactly the given entries (tuples stay tuples), and the version */
    if (PyList_SetSlice(sm->state, 0, PyList_GET_SIZE(sm->state), entries) < 0 ||
        PyList_SetItem(sm->version, 0, Py_NewRef(version)) < 0) {
        goto done;
    }
    result = 0;
done:
    if (result < 0 && appended) {
        /* leave the model as it was: nothing half-loaded (emptying a list cannot fail) */
        PyObject *exc = PyErr_GetRaisedException();
        (void)PyList_SetSlice(sm->state, 0, PyList_GET_SIZE(sm->state), NULL);
        PyErr_SetRaisedException(exc);
    }
    Py_XDECREF(current);
    Py_XDECREF(copy);
    Py_XDECREF(entries);
    Py_XDECREF(config);
    return result;
}

void
sm_drop_state(ModuleState *st, PyObject *model)
{
    PyObject *exc = PyErr_GetRaisedException();
    if (PyObject_DelAttr(model, st->s_state_key) < 0 || PyObject_DelAttr(model, st->s_version_key) < 0) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear(); /* not there: nothing to undo */
        }
        else {
            PyErr_WriteUnraisable(model); /* the caller's error is the one to see */
        }
    }
    PyErr_SetRaisedException(exc);
}

int
sm_transfer(ModuleState *st, PyObject *model_from, PyObject *model_to)
{
    StateManager *from = NULL, *to = NULL, *check = NULL;
    int result = -1;

    if ((from = sm_new(st, model_from, 0)) == NULL || (to = sm_new(st, model_to, 1)) == NULL) {
        goto done;
    }
    if (sm_load_state_dict(st, to, from->state, PyList_GET_ITEM(from->version, 0)) < 0) {
        sm_drop_state(st, model_to); /* undo the fresh, empty state so model_to is as it was */
        goto done;
    }
    if (PyObject_SetAttr(model_to, st->s_state_key, from->state) < 0 ||
        (check = sm_new(st, model_to, 0)) == NULL || PyObject_DelAttr(model_from, st->s_state_key) < 0) {
        goto done;
    }
    result = 0;
done:
    Py_XDECREF(from);
    Py_XDECREF(to);
    Py_XDECREF(check);
    return result;
}

/* ---- Python methods --------------------------------------------------------------- */

PyDoc_STRVAR(is_converted_doc,
"is_converted($cls, /, model, is_root=False)\n--\n\n"
"Whether some module of `model` carries modelopt state.  Raises AssertionError when\n"
"several modules do, or, with is_root=True, when the one that does is not the root.");

static PyObject *
sm_py_is_converted(PyObject *cls, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"model", "is_root", NULL};
    PyObject *model;
    int is_root = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|p:is_converted", kwlist, &model, &is_root)) {
        return NULL;
    }
    ModuleState *st = module_state_from_type((PyTypeObject *)cls);
    if (st == NULL) {
        return NULL;
    }
    int r = sm_is_converted(st, model, is_root);
    return r < 0 ? NULL : PyBool_FromLong(r);
}

PyDoc_STRVAR(state_dict_doc, "state_dict($self, /)\n--\n\nThe state list itself (a reference, not a copy).");

static PyObject *
sm_py_state_dict(StateManager *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef(self->state);
}

PyDoc_STRVAR(load_state_dict_doc,
"load_state_dict($self, /, state_dict, version=None)\n--\n\n"
"Load a list of (mode_name, {'config', 'metadata'}) entries into this empty manager:\n"
"each entry is replayed through add_mode (configs validate, mode order is checked),\n"
"then the state equals the given entries.  On error nothing is loaded.  Warns when\n"
"`version` differs from the current one in major.minor.");

static PyObject *
sm_py_load_state_dict(StateManager *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"state_dict", "version", NULL};
    PyObject *state_dict, *version = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O:load_state_dict", kwlist, &state_dict, &version)) {
        return NULL;
    }
    ModuleState *st = module_state_from_type(Py_TYPE(self));
    if (st == NULL || sm_load_state_dict(st, self, state_dict, version) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(transfer_state_dict_doc,
"transfer_state_dict($cls, /, model_from, model_to)\n--\n\n"
"Move the state (the same list object) from `model_from` to `model_to`, which must\n"
"have none; afterwards `model_from` has none.");

static PyObject *
sm_py_transfer_state_dict(PyObject *cls, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"model_from", "model_to", NULL};
    PyObject *model_from, *model_to;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:transfer_state_dict", kwlist, &model_from, &model_to)) {
        return NULL;
    }
    ModuleState *st = module_state_from_type((PyTypeObject *)cls);
    if (st == NULL || sm_transfer(st, model_from, model_to) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(has_state_for_mode_type_doc,
"has_state_for_mode_type($cls, /, mode_type, *, model=None, state=None)\n--\n\n"
"Whether the model's (or the given modelopt state's) modes include one of the\n"
"registry named `mode_type` (e.g. 'quantization').  Give exactly one of model/state.");

static PyObject *
sm_py_has_state_for_mode_type(PyObject *cls, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"mode_type", "model", "state", NULL};
    PyObject *mode_type, *model = Py_None, *state = Py_None;
    PyObject *owned_state = NULL, *registry = NULL, *entries = NULL, *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$OO:has_state_for_mode_type", kwlist, &mode_type, &model,
                                     &state)) {
        return NULL;
    }
    ModuleState *st = module_state_from_type((PyTypeObject *)cls);
    if (st == NULL) {
        return NULL;
    }
    int has_model = PyObject_IsTrue(model), has_state = PyObject_IsTrue(state);
    if (has_model < 0 || has_state < 0) {
        return NULL;
    }
    if (has_model == has_state) {
        PyErr_SetString(PyExc_ValueError, "Must provide either model or state!");
        return NULL;
    }
    if (has_model) {
        if ((owned_state = conversion_modelopt_state_impl(st, model)) == NULL) {
            goto done;
        }
        state = owned_state;
    }
    if ((registry = runtime_call(st, CB_GET_REGISTRY_BY_NAME, &mode_type, 1)) == NULL ||
        (entries = PyObject_GetItem(state, st->s_modelopt_state_dict)) == NULL) {
        goto done;
    }
    PyObject *fast = PySequence_Fast(entries, "'modelopt_state_dict' must be a list");
    if (fast == NULL) {
        goto done;
    }
    int any = 0;
    for (Py_ssize_t i = 0; !any && i < PySequence_Fast_GET_SIZE(fast); i++) {
        PyObject *name, *mstate;
        if (sm_entry(st, PySequence_Fast_GET_ITEM(fast, i), i, &name, &mstate) < 0 ||
            (any = PySequence_Contains(registry, name)) < 0) {
            Py_DECREF(fast);
            goto done;
        }
    }
    Py_DECREF(fast);
    result = PyBool_FromLong(any);
done:
    Py_XDECREF(owned_state);
    Py_XDECREF(registry);
    Py_XDECREF(entries);
    return result;
}

PyDoc_STRVAR(remove_state_doc, "remove_state($cls, /, model)\n--\n\nDelete the state attribute from `model`.");

static PyObject *
sm_py_remove_state(PyObject *cls, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *model = args_one("remove_state", "model", args, nargs, kwnames);
    ModuleState *st = model == NULL ? NULL : module_state_from_type((PyTypeObject *)cls);
    if (st == NULL || PyObject_DelAttr(model, st->s_state_key) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(modes_with_states_doc,
"modes_with_states($self, /)\n--\n\n"
"An iterator of (descriptor, config, metadata): each recorded mode with its config\n"
"rebuilt through the mode's config class.");

static PyObject *
sm_py_modes_with_states(StateManager *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = NULL, *descriptor = NULL, *config = NULL, *item = NULL, *iter = NULL;
    ModuleState *st = module_state_from_type(Py_TYPE(self));
    if (st == NULL || (out = PyList_New(0)) == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(self->state); i++) {
        PyObject *name, *mstate;
        if (sm_entry(st, PyList_GET_ITEM(self->state, i), i, &name, &mstate) < 0) {
            goto done;
        }
        PyObject *cfg = PyDict_GetItemWithError(mstate, st->s_config);
        PyObject *metadata = cfg ? PyDict_GetItemWithError(mstate, st->s_metadata) : NULL;
        if (metadata == NULL || (config = sm_config_object(st, name, cfg)) == NULL ||
            (descriptor = sm_descriptor(st, name)) == NULL ||
            (item = PyTuple_Pack(3, descriptor, config, metadata)) == NULL || PyList_Append(out, item) < 0) {
            goto done;
        }
        Py_CLEAR(descriptor);
        Py_CLEAR(config);
        Py_CLEAR(item);
    }
    iter = PyObject_GetIter(out);
done:
    Py_XDECREF(out);
    Py_XDECREF(descriptor);
    Py_XDECREF(config);
    Py_XDECREF(item);
    return iter;
}

PyDoc_STRVAR(get_config_class_doc,
"get_config_class($cls, /, mode, config)\n--\n\n"
"The mode's config class built from the `config` dict (validated): a ModeloptBaseConfig.");

static PyObject *
sm_py_get_config_class(PyObject *cls, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"mode", "config", NULL};
    PyObject *mode, *config;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:get_config_class", kwlist, &mode, &config)) {
        return NULL;
    }
    ModuleState *st = module_state_from_type((PyTypeObject *)cls);
    if (st == NULL) {
        return NULL;
    }
    return sm_config_object(st, mode, config);
}

PyDoc_STRVAR(check_mode_doc,
"check_mode($self, /, mode)\n--\n\n"
"Raise AssertionError when `mode` may not come next: the export stack, and the\n"
"next_modes / next_prohibited_modes of the last mode and of the last mode waiting\n"
"for its export.");

static PyObject *
sm_py_check_mode(StateManager *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *mode = args_one("check_mode", "mode", args, nargs, kwnames);
    ModuleState *st = mode == NULL ? NULL : module_state_from_type(Py_TYPE(self));
    if (st == NULL || sm_check_mode(st, self, mode) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(add_mode_doc,
"add_mode($self, /, mode, config, metadata)\n--\n\n"
"check_mode, then append (name, {'config': config.model_dump(), 'metadata': metadata}).");

static PyObject *
sm_py_add_mode(StateManager *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"mode", "config", "metadata", NULL};
    PyObject *mode, *config, *metadata;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:add_mode", kwlist, &mode, &config, &metadata)) {
        return NULL;
    }
    ModuleState *st = module_state_from_type(Py_TYPE(self));
    if (st == NULL || sm_add_mode(st, self, mode, config, metadata) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(update_new_doc,
"update_last_state_before_new_mode($self, /, model)\n--\n\n"
"Run the last mode's update_for_new_mode(model, config, metadata) and store the config back.");

static PyObject *
sm_py_update_before_new_mode(StateManager *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *model = args_one("update_last_state_before_new_mode", "model", args, nargs, kwnames);
    ModuleState *st = model == NULL ? NULL : module_state_from_type(Py_TYPE(self));
    if (st == NULL || sm_update_last(st, self, model, st->s_update_for_new_mode) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(update_save_doc,
"update_last_state_before_save($self, /, model)\n--\n\n"
"Run the last mode's update_for_save(model, config, metadata) and store the config back.");

static PyObject *
sm_py_update_before_save(StateManager *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *model = args_one("update_last_state_before_save", "model", args, nargs, kwnames);
    ModuleState *st = model == NULL ? NULL : module_state_from_type(Py_TYPE(self));
    if (st == NULL || sm_update_last(st, self, model, st->s_update_for_save) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---- properties ------------------------------------------------------------------- */

static PyObject *
sm_get_has_state(StateManager *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(PyList_GET_SIZE(self->state) > 0);
}

static PyObject *
sm_get_state_version(StateManager *self, void *Py_UNUSED(closure))
{
    return PySequence_GetItem(self->version, 0);
}

static PyObject *
sm_get_last_mode(StateManager *self, void *Py_UNUSED(closure))
{
    ModuleState *st = module_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return NULL;
    }
    PyObject *name, *mstate;
    int has_last = sm_last_entry(st, self, &name, &mstate);
    if (has_last < 0) {
        return NULL;
    }
    return has_last ? sm_descriptor(st, name) : Py_NewRef(Py_None);
}

static PyObject *
sm_get_export_stack(StateManager *self, void *Py_UNUSED(closure))
{
    ModuleState *st = module_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return NULL;
    }
    PyObject *stack = sm_export_stack(st, self);
    if (stack == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_CallOneArg(st->deque, stack);
    Py_DECREF(stack);
    return result;
}

static PyObject *
sm_get_last_metadata(StateManager *self, void *Py_UNUSED(closure))
{
    ModuleState *st = module_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return NULL;
    }
    PyObject *name, *mstate;
    int has_last = sm_last_entry(st, self, &name, &mstate);
    if (has_last <= 0) {
        if (has_last == 0) {
            PyErr_SetString(PyExc_IndexError, "the model has no mode yet");
        }
        return NULL;
    }
    return PyObject_GetItem(mstate, st->s_metadata);
}

static PyObject *
sm_get_last_config(StateManager *self, void *Py_UNUSED(closure))
{
    ModuleState *st = module_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return NULL;
    }
    PyObject *name, *mstate, *cfg = NULL;
    int has_last = sm_last_entry(st, self, &name, &mstate);
    if (has_last <= 0) {
        if (has_last == 0) {
            PyErr_SetString(PyExc_IndexError, "the model has no mode yet");
        }
        return NULL;
    }
    if ((cfg = PyObject_GetItem(mstate, st->s_config)) == NULL) {
        return NULL;
    }
    PyObject *result = sm_config_object(st, name, cfg);
    Py_DECREF(cfg);
    return result;
}

static int
sm_set_last_config(StateManager *self, PyObject *value, void *Py_UNUSED(closure))
{
    ModuleState *st = module_state_from_type(Py_TYPE(self));
    PyObject *name, *mstate;
    if (st == NULL) {
        return -1;
    }
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_last_config cannot be deleted");
        return -1;
    }
    int has_last = sm_last_entry(st, self, &name, &mstate);
    if (has_last <= 0) {
        if (has_last == 0) {
            PyErr_SetString(PyExc_IndexError, "the model has no mode yet");
        }
        return -1;
    }
    PyObject *dumped = PyObject_CallMethodNoArgs(value, st->s_model_dump);
    if (dumped == NULL) {
        return -1;
    }
    int r = PyDict_SetItem(mstate, st->s_config, dumped);
    Py_DECREF(dumped);
    return r;
}

/* ---- repr ------------------------------------------------------------------------ */

/* New str: what waits for its export mode ("quantize needs export_q"), "" when
 * nothing does.  A mode no registry knows makes the answer unknown, not an error:
 * a repr must not raise over a state it can still show. */
static PyObject *
sm_repr_pending(ModuleState *st, StateManager *sm)
{
    PyObject *stack = sm_export_stack(st, sm), *parts = NULL, *part = NULL, *sep = NULL, *result = NULL;
    if (stack == NULL) {
        PyErr_Clear();
        return PyUnicode_FromString("; export status unknown (a mode is not registered)");
    }
    if (PyList_GET_SIZE(stack) == 0) {
        result = PyUnicode_FromString("");
        goto done;
    }
    if ((parts = PyList_New(0)) == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(stack); i++) {
        PyObject *pair = PyList_GET_ITEM(stack, i);
        if ((part = PyUnicode_FromFormat("%S needs %S", PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1))) ==
                NULL ||
            PyList_Append(parts, part) < 0) {
            goto done;
        }
        Py_CLEAR(part);
    }
    if ((sep = PyUnicode_FromString(", ")) == NULL || (part = PyUnicode_Join(sep, parts)) == NULL) {
        goto done;
    }
    result = PyUnicode_FromFormat("; export pending: %U", part);
done:
    Py_XDECREF(stack);
    Py_XDECREF(parts);
    Py_XDECREF(part);
    Py_XDECREF(sep);
    return result;
}

/* <modelopt_c.ModeloptStateManager: 2 modes a -> b; export pending: a needs export_a; version '0.47.0'>:
 * the modes in order, what still waits for its export mode, the state version.  An
 * entry that is not a (name, state) pair shows as "<invalid entry i>". */
static PyObject *
sm_repr(StateManager *self)
{
    ModuleState *st = module_state_from_type(Py_TYPE(self));
    PyObject *names = NULL, *name = NULL, *sep = NULL, *modes = NULL, *pending = NULL, *version = NULL,
             *result = NULL;
    if (st == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(self->state);
    if ((names = PyList_New(0)) == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *entry_name, *mstate;
        if (sm_entry(st, PyList_GET_ITEM(self->state, i), i, &entry_name, &mstate) < 0) {
            PyErr_Clear();
            name = PyUnicode_FromFormat("<invalid entry %zd>", i);
        }
        else {
            name = Py_NewRef(entry_name);
        }
        if (name == NULL || PyList_Append(names, name) < 0) {
            goto done;
        }
        Py_CLEAR(name);
    }
    if (n == 0) {
        modes = PyUnicode_FromString("no modes");
    }
    else if ((sep = PyUnicode_FromString(" -> ")) != NULL && (name = PyUnicode_Join(sep, names)) != NULL) {
        modes = PyUnicode_FromFormat("%zd mode%s %U", n, n == 1 ? "" : "s", name);
    }
    if (modes == NULL || (pending = sm_repr_pending(st, self)) == NULL) {
        goto done;
    }
    if ((version = PySequence_GetItem(self->version, 0)) == NULL) {
        PyErr_Clear();
        version = Py_NewRef(Py_None);
    }
    result = PyUnicode_FromFormat("<%s: %U%U; version %R>", Py_TYPE(self)->tp_name, modes, pending, version);
done:
    Py_XDECREF(names);
    Py_XDECREF(name);
    Py_XDECREF(sep);
    Py_XDECREF(modes);
    Py_XDECREF(pending);
    Py_XDECREF(version);
    return result;
}

static PyMethodDef sm_methods[] = {
    {"is_converted", (PyCFunction)(void (*)(void))sm_py_is_converted, METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     is_converted_doc},
    {"state_dict", (PyCFunction)sm_py_state_dict, METH_NOARGS, state_dict_doc},
    {"load_state_dict", (PyCFunction)(void (*)(void))sm_py_load_state_dict, METH_VARARGS | METH_KEYWORDS,
     load_state_dict_doc},
    {"transfer_state_dict", (PyCFunction)(void (*)(void))sm_py_transfer_state_dict,
     METH_VARARGS | METH_KEYWORDS | METH_CLASS, transfer_state_dict_doc},
    {"has_state_for_mode_type", (PyCFunction)(void (*)(void))sm_py_has_state_for_mode_type,
     METH_VARARGS | METH_KEYWORDS | METH_CLASS, has_state_for_mode_type_doc},
    {"remove_state", (PyCFunction)(void (*)(void))sm_py_remove_state, METH_FASTCALL | METH_KEYWORDS | METH_CLASS,
     remove_state_doc},
    {"modes_with_states", (PyCFunction)sm_py_modes_with_states, METH_NOARGS, modes_with_states_doc},
    {"get_config_class", (PyCFunction)(void (*)(void))sm_py_get_config_class,
     METH_VARARGS | METH_KEYWORDS | METH_CLASS, get_config_class_doc},
    {"check_mode", (PyCFunction)(void (*)(void))sm_py_check_mode, METH_FASTCALL | METH_KEYWORDS, check_mode_doc},
    {"add_mode", (PyCFunction)(void (*)(void))sm_py_add_mode, METH_VARARGS | METH_KEYWORDS, add_mode_doc},
    {"update_last_state_before_new_mode", (PyCFunction)(void (*)(void))sm_py_update_before_new_mode,
     METH_FASTCALL | METH_KEYWORDS, update_new_doc},
    {"update_last_state_before_save", (PyCFunction)(void (*)(void))sm_py_update_before_save,
     METH_FASTCALL | METH_KEYWORDS, update_save_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef sm_getset[] = {
    {"has_state", (getter)sm_get_has_state, NULL, "Whether any mode is recorded.", NULL},
    {"state_version", (getter)sm_get_state_version, NULL, "The version string stored with the state.", NULL},
    {"last_mode", (getter)sm_get_last_mode, NULL, "Descriptor of the last recorded mode, or None.", NULL},
    {"_export_stack", (getter)sm_get_export_stack, NULL,
     "deque of (mode, export_mode) pairs still waiting for their export mode.", NULL},
    {"_last_metadata", (getter)sm_get_last_metadata, NULL, "Metadata of the last mode.", NULL},
    {"_last_config", (getter)sm_get_last_config, (setter)sm_set_last_config,
     "Config object of the last mode; assigning stores its model_dump().", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef sm_members[] = {
    {"_state", T_OBJECT_EX, offsetof(StateManager, state), READONLY, "The state list (shared with the model)."},
    {"_state_version", T_OBJECT_EX, offsetof(StateManager, version), READONLY,
     "The one-element version list (shared with the model)."},
    {NULL, 0, 0, 0, NULL},
};

PyDoc_STRVAR(sm_doc,
"ModeloptStateManager(model=None, init_state=False)\n--\n\n"
"The record of the modes applied to a model, kept on the model's root module as\n"
"`_modelopt_state` (a list of (mode_name, {'config', 'metadata'})) and\n"
"`_modelopt_state_version`.  The manager holds references to those lists, so what\n"
"it changes, the model carries.  With no model (or a falsy one) a fresh nn.Module\n"
"is used.  init_state=True creates the state and raises AssertionError if the model\n"
"already has one; afterwards the root must hold state.");

static PyType_Slot sm_slots[] = {
    {Py_tp_doc, (void *)sm_doc},
    {Py_tp_new, sm_tp_new},
    {Py_tp_dealloc, sm_dealloc},
    {Py_tp_repr, sm_repr},
    {Py_tp_traverse, sm_traverse},
    {Py_tp_clear, sm_clear},
    {Py_tp_methods, sm_methods},
    {Py_tp_getset, sm_getset},
    {Py_tp_members, sm_members},
    {0, NULL},
};

PyType_Spec state_manager_spec = {
    .name = "modelopt_c.ModeloptStateManager",
    .basicsize = sizeof(StateManager),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = sm_slots,
};
