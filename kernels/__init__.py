"""Numba kernels: the multi-block JEPA mask sampler with USrc (`usjepa.kernels.block_masks`)."""
