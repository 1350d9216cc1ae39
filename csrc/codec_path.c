/* Key paths of the codec's error messages.  Every function here runs while an
 * error is being reported, so a failure to build the path itself (no memory, a
 * key whose repr raises) is dropped: the error matters more than its location. */
#include "codec_path.h"

/* Steals `component`; NULL: it could not be made (its exception is dropped). */
static void
path_push(PyObject **path, PyObject *component)
{
    if (component != NULL && *path == NULL) {
        *path = PyList_New(0);
    }
    if (component == NULL || *path == NULL || PyList_Append(*path, component) < 0) {
        PyErr_Clear(); /* see the top of the file: the path is best effort */
    }
    Py_XDECREF(component);
}

void
codec_path_push_index(PyObject **path, Py_ssize_t i)
{
    path_push(path, PyUnicode_FromFormat("[%zd]", i));
}

void
codec_path_push_text(PyObject **path, const char *text)
{
    path_push(path, PyUnicode_FromString(text));
}

/* "[repr(key)]", the repr cut to `shown` characters; NULL with an exception set. */
static PyObject *
path_key_repr(PyObject *key, Py_ssize_t shown)
{
    PyObject *repr = NULL, *head = NULL, *result = NULL;
    if ((repr = PyObject_Repr(key)) == NULL) {
        goto done;
    }
    if (PyUnicode_GET_LENGTH(repr) <= shown) {
        result = PyUnicode_FromFormat("[%U]", repr);
    }
    else if ((head = PyUnicode_Substring(repr, 0, shown)) != NULL) {
        result = PyUnicode_FromFormat("[%U...]", head);
    }
done:
    Py_XDECREF(repr);
    Py_XDECREF(head);
    return result;
}

void
codec_path_push_key(PyObject **path, PyObject *key, int depth, Py_ssize_t shown)
{
    PyObject *component = NULL;
    if (depth == 0 && PyUnicode_CheckExact(key) && PyUnicode_GET_LENGTH(key) <= shown &&
        PyUnicode_IsIdentifier(key)) {
        component = Py_NewRef(key); /* the example style: modelopt_state_dict[1]... */
    }
    else if ((component = path_key_repr(key, shown)) == NULL) {
        PyErr_Clear(); /* the key's repr raised: see the top of the file */
        component = PyUnicode_FromString("[?]");
    }
    path_push(path, component);
}

/* The components of `path` (innermost first) outermost first, with the middle of
 * a long path replaced by "...(N more)...". */
static PyObject *
path_parts(PyObject *path)
{
    PyObject *parts = NULL, *gap = NULL, *result = NULL;
    Py_ssize_t n = PyList_GET_SIZE(path);
    if ((parts = PyList_New(0)) == NULL) {
        goto done;
    }
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        Py_ssize_t outer = n - 1 - i;
        int hidden = n > 2 * CODEC_PATH_SHOWN && outer >= CODEC_PATH_SHOWN && i >= CODEC_PATH_SHOWN;
        if (hidden && outer == CODEC_PATH_SHOWN) {
            if ((gap = PyUnicode_FromFormat("...(%zd more)...", n - 2 * CODEC_PATH_SHOWN)) == NULL ||
                PyList_Append(parts, gap) < 0) {
                goto done;
            }
        }
        if (!hidden && PyList_Append(parts, PyList_GET_ITEM(path, i)) < 0) {
            goto done;
        }
    }
    result = Py_NewRef(parts);
done:
    Py_XDECREF(parts);
    Py_XDECREF(gap);
    return result;
}

PyObject *
codec_path_render(PyObject *path)
{
    PyObject *parts = NULL, *sep = NULL, *result = NULL;
    if (path == NULL || PyList_GET_SIZE(path) == 0) {
        result = PyUnicode_FromString("the top level");
    }
    else if ((parts = path_parts(path)) != NULL && (sep = PyUnicode_FromString("")) != NULL) {
        result = PyUnicode_Join(sep, parts);
    }
    if (result == NULL) {
        PyErr_Clear(); /* see the top of the file: the caller says "?" instead */
    }
    Py_XDECREF(parts);
    Py_XDECREF(sep);
    return result;
}
