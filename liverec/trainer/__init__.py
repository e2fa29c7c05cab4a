"""Online training loop, checkpoint/recovery, user-state refresh, parameter publishing."""
