// The Python module mixkernels._C. Importing it runs the static TORCH_LIBRARY_IMPL registrations
// of every kernel file linked into it; the op schemas themselves are defined in Python
// (mixkernels/_library.py), so there is no pybind11 and no Python API here.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
