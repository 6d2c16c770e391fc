"""The PEFT method: `FishConfig`, the sparse-diff layers, the tuner that injects, merges and unloads them, the adapter
file format and its checks, and the registration with PEFT."""
