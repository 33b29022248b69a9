"""Warm load time of a GGUF: the file read once into the page cache, then Model(FILE) three times
(developer script; PYTHONPATH selects whose mllama_q is measured).

    PYTHONPATH=. python bench/warm_load.py FILE
"""
import json
import os
import sys
import time
import warnings

p = sys.argv[1]
with open(p, "rb") as f:
    while f.read(64 << 20):
        pass
import mllama_q  # noqa: E402

warnings.simplefilter("ignore")
res = []
for _i in range(3):
    w, c = time.perf_counter(), time.process_time()
    m = mllama_q.Model(p, n_threads=2)
    res.append((time.perf_counter() - w, time.process_time() - c))
    del m
print(json.dumps({"file": p, "code": mllama_q.__file__, "loads_wall_cpu": res, "loadavg": os.getloadavg()[0]}))
