"""peftjax.train."""
