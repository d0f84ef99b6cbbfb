"""Forward step, train step (and later: schedules, loop, checkpointing)."""
