"""peftjax.objectives."""
