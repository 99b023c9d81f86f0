"""peftjax.methods."""
