"""The numeric core: kernels, retrieval, the in-memory snapshot and the rank pipeline."""
