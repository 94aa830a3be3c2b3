"""oclaw's inference core: repository, sessions, model pool and the V2 codec (no web framework)."""

__version__ = "0.1.0"
