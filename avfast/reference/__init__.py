"""Plain-PyTorch references: the oracle for every kernel, and the CPU path."""
