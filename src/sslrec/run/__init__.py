"""The run's edge: the workdir (the only module that knows output paths), checkpoints, reliability
(signals, non-finite reports, preemption), and the local multi-process cluster."""
