"""Fast exact kernels, each equal to a plain expression of `methods.reference`."""
