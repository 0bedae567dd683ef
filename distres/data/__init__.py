"""Input pipelines. ``build(cfg, ctx, memory_format)`` returns the train and val loaders."""

from distres.data.loaders import DataBundle, Loader, build

__all__ = ["DataBundle", "Loader", "build"]
