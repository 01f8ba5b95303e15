"""usjepa: US-JEPA / SALT pretraining of ultrasound foundation models.

Subpackages: ``usjepa.ingest`` (raw files -> shards), ``usjepa.shards`` (shard format, sampler, DALI
pipeline), ``usjepa.kernels`` (Numba kernels), ``usjepa.models``, ``usjepa.train``, ``usjepa.probe``.
"""

import os

# OpenCV's thread pool does not survive fork(): a child forked after its parent used the pool deadlocks in
# its first OpenCV call, and our DataLoader and DALI workers fork. Parallelism here is across processes,
# so OpenCV runs one thread per process. OpenCV reads this when it first creates the pool, so setting it
# at import of usjepa is early enough even when cv2 was imported before.
os.environ.setdefault("OPENCV_FOR_THREADS_NUM", "1")

__version__ = "0.1.0"
