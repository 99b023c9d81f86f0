"""peftjax.quant."""
