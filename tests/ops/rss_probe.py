"""Run in a fresh process: load SmolLM2, switch core counts, print RSS figures as JSON.

usage: rss_probe.py MODELS_DIR MODE   (MODE: affinity | rebuild | two-sessions)
"""

import gc
import json
import sys
import threading

from edged.models.loading import load_engine
from edged.engine.request import GenerateRequest
from edged.engine.runner import EngineConfig, Runner
from edged.models.store import ModelStore
from edged.ops.throttle import throttle_engine


def rss_mb(key: str = "VmRSS") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def gen(engine):
    req = GenerateRequest.from_dict({"prompt": "The capital of France is", "options": {"temperature": 0, "num_predict": 8}})
    engine.generate(req, cancel=threading.Event()).run()


models, mode = sys.argv[1], sys.argv[2]
engine = load_engine("smollm2-135m", config=EngineConfig(threads=2), store=ModelStore(models))
gen(engine)
out = {"mode": mode, "one_session_mb": rss_mb(), "one_session_peak_mb": rss_mb("VmHWM")}
if mode == "two-sessions":
    extra = Runner(str(engine.model.file("model")), engine.info, EngineConfig(threads=1))
    extra.sequence(16).forward([1, 2, 3])
    out["after_mb"] = rss_mb()
else:
    runner = throttle_engine(engine, mode=mode)
    for n in (1, 2, 1, 2, 1):
        runner.set_threads(n)
        gen(engine)
        gc.collect()
    out["after_mb"] = rss_mb()
out["peak_mb"] = rss_mb("VmHWM")
print(json.dumps(out))
