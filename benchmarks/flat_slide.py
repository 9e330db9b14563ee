"""Memory of a slide without a pyramid: the thumbnail of one huge tiled level.

Writes a single-level tiled TIFF that declares ``--side`` x ``--side`` pixels (a few MB on
disk: every tile is the same flat grey), opens it as cellkit predict does
(``is_whole_slide``, ``open_slide``, ``Slide.thumbnail``) in a new process, and prints JSON:
the wall time and the process's peak resident memory. Before issue 25 the thumbnail decoded
the whole level at once (a 30000 x 30000 file: ``MemoryError`` after 11 GB); now it is read
block by block.

Usage::

    python benchmarks/flat_slide.py --side 30000
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CHILD = """
import json, resource, sys, time
from cellkit.wsi import is_whole_slide, open_slide
t = time.perf_counter()
slide = is_whole_slide(sys.argv[1])
with open_slide(sys.argv[1]) as s:
    thumb, _ = s.thumbnail(1024)
print(json.dumps({"read_as_slide": slide, "thumbnail": list(thumb.shape), "seconds": round(time.perf_counter() - t, 1),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=30000)
    args = parser.parse_args()
    import tifffile

    tile = np.full((512, 512, 3), 230, np.uint8)
    n = (args.side + 511) // 512
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "flat.tif"
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            tif.write((tile for _ in range(n * n)), shape=(args.side, args.side, 3), dtype=np.uint8,
                      tile=(512, 512), photometric="rgb", compression="deflate")
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result.update({"side": args.side, "file_mb": round(path.stat().st_size / 1e6, 1),
                       "process_seconds": round(time.perf_counter() - t, 1), "machine": platform.machine(),
                       "load_average": [round(v, 2) for v in __import__("os").getloadavg()]})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
