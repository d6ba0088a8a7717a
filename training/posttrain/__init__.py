"""Post-training: chat data, SFT, reward models, DPO and GRPO (the tasks live in training/tasks/)."""
