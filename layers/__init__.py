"""Lambda layers for oclaw, built offline: runtime dependencies per Python and architecture, and model repositories."""
