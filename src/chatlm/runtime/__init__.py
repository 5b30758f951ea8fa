"""Runtime services shared by every stage: ranks, devices, run directories, metrics."""
