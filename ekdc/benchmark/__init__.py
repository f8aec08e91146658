"""``ekdc bench``: latency, throughput, memory, size, params/MACs and accuracy of exported models
against the teacher ensemble, each model measured in its own process.

    from ekdc.benchmark import bench
    report = bench(["export/student.onnx", "export/student.int8.onnx"], batches=(1, 64))

    settings.py  what a bench runs with, checked up front     valdata.py  the validation images
    rounds.py    the models, and rounds of child processes    _worker.py  the measured child process
    pooling.py   rounds -> the report (the JSON contract)     report.py   table, markdown, plot
    machine.py   where it ran                                 runner.py   ``bench``, ``time_models``
"""

__all__ = ["bench", "time_models"]


def __getattr__(name: str):
    # lazy: the measuring process (python -m ekdc.benchmark._worker) imports this package, and its memory
    # reading must hold the runtime and the model, not torch, pydantic and the rest that runner.py brings
    if name in __all__:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'ekdc.benchmark' has no attribute {name!r}")
