"""Unicorn assets: one module per stage (with its checks); the stage logic lives in `logic/`."""
