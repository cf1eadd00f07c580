"""Triage a crash from its log (``diaglib triage LOG``): what the log says, and what the installed vLLM makes of it.

- :mod:`.lines`: bytes -> text -> one record per line (colours, CRLF, container and process prefixes, JSON)
- :mod:`.values`: vLLM's printed objects (reprs, pydantic JSON, dump notation) read back, tolerantly
- :mod:`.tracebacks`: tracebacks per process; the kernel a frame launches; launch vs synchronisation
- :mod:`.dump`: vLLM's crash input dump (``SchedulerOutput``) as a step
- :mod:`.parse`: everything in one pass (:class:`~.parse.LogFacts`)
- :mod:`.crash`: the root traceback and what it says
- :mod:`.rebuild`: the serve command, spelled and resolved by vLLM, compared with the engine line
- :mod:`.replay`: the step through vLLM's dispatcher, compiled ranges, MoE layer, boundaries, kernel census
- :mod:`.suspects`: every known bug class with the evidence for and against, and the next commands
- :mod:`.diagnose`: all of it (:func:`~.diagnose.triage`), as text and JSON
- :mod:`.handover`: the command line's reading of the log and hand-over to the log's vLLM environment
- :mod:`.emit`: vLLM's own log lines made on the CPU (examples, tests)
"""
