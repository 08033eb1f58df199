"""The training machinery shared by every task: loop, step, state, optimizer and schedules, checkpoints, metric writers, sharding, transfer."""
