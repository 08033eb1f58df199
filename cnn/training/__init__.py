"""The training machinery shared by every task: the loop and its hooks, the
batch order, step, state, optimizer and schedules, checkpoints, run folders
and provenance, metric writers, sharding, transfer, the compilation cache.
It imports no task, op or dataset (`cnn.runs` hands the loop a `Run`)."""
