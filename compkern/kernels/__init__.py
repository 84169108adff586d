"""Kernels: ``reference`` (plain torch, the definition of every op), ``triton`` (@triton.jit), and
the C++ extension ``compkern._C`` built from csrc/."""
