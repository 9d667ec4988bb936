"""Run-time services: checkpoints, JSONL stores, processes and FSDP, trackers, library compatibility."""
