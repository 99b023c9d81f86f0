"""peftjax.data."""
