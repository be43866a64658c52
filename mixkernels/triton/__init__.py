"""@triton.jit kernels and plain launchers. Imported only when the triton backend runs, so
``import mixkernels`` never imports triton. Launchers make no ``torch.cuda`` calls, so the same
code runs on CPU tensors under ``TRITON_INTERPRET=1``."""
