"""Kernel launches (Triton, cuBLASLt through ctypes), each beside its torch reference.  Used by
``ditkit.fast`` only; importing a kernel module never needs a GPU (Triton is optional)."""
