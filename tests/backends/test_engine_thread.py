"""In-process engines run on one thread of their own: libgomp keeps an OpenMP pool per thread that ran a parallel
region, and with more pooled threads than CPUs every region pays a wake-up (backends.base.EngineThread)."""

import asyncio
import threading

from backends.base import EngineThread


def test_an_engine_loads_and_streams_on_one_thread_which_ends_at_close():
    async def run():
        engine = EngineThread("e")
        loaded = await engine.call(threading.current_thread)

        def work(emit):
            for _ in range(3):
                emit(threading.current_thread())
            return threading.current_thread()

        streams = [engine.stream(work) for _ in range(2)]
        seen = [[event async for event in stream] for stream in streams]
        engine.close()
        return loaded, seen, [s.result for s in streams]

    loaded, seen, results = asyncio.run(run())
    assert loaded is not threading.main_thread() and loaded.name.startswith("e-engine")
    assert all(t is loaded for events in seen for t in events) and results == [loaded, loaded]
    loaded.join(timeout=10)
    assert not loaded.is_alive()
