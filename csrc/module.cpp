// `import lowbit._C` loads this shared library, whose static initialisers register the ops
// (registration.cpp). The module itself holds only build facts.
#include <Python.h>

static PyModuleDef lowbit_module = {PyModuleDef_HEAD_INIT, "_C",
                                    "lowbit's compiled ops (registered under torch.ops.lowbit)", -1,
                                    nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&lowbit_module);
  if (m == nullptr) return nullptr;
#ifdef LOWBIT_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
