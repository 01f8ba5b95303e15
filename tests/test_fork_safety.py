"""A worker forked after the parent used OpenCV must not deadlock (it did: the full suite hung in the
DataLoader's forked workers after the ingest tests had used OpenCV's thread pool in-process)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import cv2, numpy as np, multiprocessing as mp
    import usjepa  # must make OpenCV fork-safe, even though cv2 was imported first
    img = np.random.randint(0, 255, (1500, 1500, 3), np.uint8)
    for _ in range(3):
        cv2.GaussianBlur(cv2.resize(img, (1200, 1200)), (0, 0), 3)
    def child(q):
        cv2.setNumThreads(1)  # what every loader/ingest worker does first; this is where it deadlocked
        q.put(int(cv2.GaussianBlur(img, (0, 0), 3).sum() % 7))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    p.join(20)
    if p.is_alive():
        p.kill()
        raise SystemExit("forked child deadlocked in OpenCV")
    print("ok", q.get())
""")


def test_forked_child_can_use_opencv_after_parent_did():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.startswith("ok")
