"""Unicorn assets, the middle layer: one module per stage (with its checks) and the seed_shards
partitions; the stage logic lives in `logic/`, in a module of the same name."""
