"""``ekdc bench``: latency, throughput, memory, size, params/MACs and accuracy of exported models
against the teacher ensemble, each model measured in its own process.

    from ekdc.benchmark import bench
    report = bench(["export/student.onnx", "export/student.int8.onnx"], batches=(1, 64))
"""
from .runner import bench

__all__ = ["bench"]
