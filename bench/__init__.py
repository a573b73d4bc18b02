"""proxyd's benchmark harness: proxyd against the upstream itself, distribution's
pull-through proxy and drayage, on the same machine, in the same run.

Every number is a ratio to the direct pull from the upstream measured in the same run,
because absolute numbers on a shared 2-core machine say little on their own.

Modules, by role:

- ``run``: the command line (``python -m bench.run [--smoke]``); wires everything up.
- ``profiles``: the sizes and repetitions of the full run and of the smoke run.
- ``procs``: child processes that die with the benchmark, and RSS of a process.
- ``relay``: an aiohttp relay process (throttling, counting, token routing).
- ``upstreams``: the real upstreams (plain and token-auth distribution, relays).
- ``proxies``: starting proxyd, distribution's proxy mode and drayage on a fresh cache.
- ``fixtures``: the test image and the large random blobs, pushed upstream.
- ``clients``: the measuring clients (time to first byte, concurrent GETs, load).
- ``loadgen``: a bounded aiohttp load generator process (when ``wrk`` is missing).
- ``pulls``, ``blobs``, ``hits``, ``memory``, ``tags``: the seven workloads.
- ``results``: samples, statistics and the targets; ``report``: table, JSON, Markdown.
"""
