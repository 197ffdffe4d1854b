"""Readers of a download's sources: one module per kind of source, chosen by :mod:`.factory`.

Call :func:`imgpipe.data.readers.factory.open_source`; see docs/sources.md.
"""
