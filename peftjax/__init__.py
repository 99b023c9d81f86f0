"""peftjax: parameter-efficient fine-tuning of pretrained transformers in JAX/Flax."""
__version__ = '0.1.0'
