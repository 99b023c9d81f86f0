"""peftjax.models."""
