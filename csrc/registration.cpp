// The Python module mixkernels._C. Importing it runs the static TORCH_LIBRARY_IMPL registrations
// of every kernel file linked into it; the op schemas themselves are defined in Python
// (mixkernels/_library.py), so there is no pybind11. The one Python function, cpu_isa(), says
// which CPU build the dispatching kernels run ("avx2" or "baseline"), for tests and info.
#include <Python.h>

#include "router_stats.h"

namespace {
PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(mixkernels::router_stats_use_avx2() ? "avx2" : "baseline");
}
PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "CPU build the router_stats kernels run: 'avx2' or 'baseline'."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
