"""Input pipelines. ``build(cfg, ctx, memory_format)`` returns the train and val loaders.

The names below load on first use, so that ``distres.prepare`` can use ``data.formats``
without importing torch."""

__all__ = ["DataBundle", "Loader", "build"]


def __getattr__(name: str):
    if name == "Loader":
        from distres.data import base

        return base.Loader
    if name in __all__:
        from distres.data import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module 'distres.data' has no attribute {name!r}")
