"""Log every XLA compilation of this process (and of vLLM's engine-core subprocess) to a file.

benchmarks/serving.py puts this folder on PYTHONPATH and names the file in
JAXLLM_BENCH_COMPILE_LOG; Python imports `sitecustomize` at start-up in every
process that inherits the environment, so the listener is installed in the engine
core too, which we cannot otherwise reach. Each line: wall time, pid, event, seconds, function.
"""

import os
import time

_LOG = os.environ.get("JAXLLM_BENCH_COMPILE_LOG")

# jax.monitoring events: one backend compile per executable built (persistent-cache
# retrievals included), and one cache hit per executable read from the compile cache.
_EVENTS = {"/jax/core/compile/backend_compile_duration": "compile",
           "/jax/compilation_cache/cache_hits": "cache_hit"}

if _LOG:
    import jax.monitoring

    def _write(event: str, seconds: float, name: str = "-") -> None:
        with open(_LOG, "a") as f:
            f.write(f"{time.time():.6f} {os.getpid()} {event} {seconds:.6f} {name.replace(' ', '_')}\n")

    def _on_duration(event, seconds, fun_name="-", **_):
        if event in _EVENTS:
            _write(_EVENTS[event], seconds, str(fun_name))

    def _on_event(event, **_):
        if event in _EVENTS:
            _write(_EVENTS[event], 0.0)

    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)
