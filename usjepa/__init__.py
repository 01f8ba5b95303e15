"""usjepa: US-JEPA / SALT pretraining of ultrasound foundation models.

Subpackages: ``usjepa.ingest`` (raw files -> shards), ``usjepa.shards`` (shard format, sampler, DALI
pipeline), ``usjepa.kernels`` (Numba kernels), ``usjepa.models``, ``usjepa.train``, ``usjepa.probe``.
"""

__version__ = "0.1.0"
