"""What a run shows: metrics sinks and the logging window (``metrics``), the profiler
window (``profiling``), the peak FLOP/s that MFU divides by (``flops``), the per-document
data audit (``audit``)."""
