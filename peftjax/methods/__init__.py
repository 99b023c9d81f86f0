"""PEFT methods as pure transforms on parameter pytrees; look one up by name with ``get``.

>>> from peftjax import methods
>>> lora = methods.get('lora', rank=8, model_type='llama')  # HF PEFT's default targets
>>> both = methods.compose(lora, methods.get('bitfit'))
>>> from_spec(both.spec).spec == both.spec    # a method's spec rebuilds it
True
"""
import functools

from peftjax.methods import adalora, targets
from peftjax.methods.adapter import bottleneck_adapter
from peftjax.methods.base import (ADAPTER, PeftMethod, Spec, by_module, compose, substitute,
                                  weight_space)
from peftjax.methods.bitfit import bitfit
from peftjax.methods.full import full
from peftjax.methods.ia3 import ia3
from peftjax.methods.lora import lora, lora_plus_labels
from peftjax.methods.prefix import prefix_tuning, ptuning_v2
from peftjax.methods.prompt import prompt_tuning, ptuning
from peftjax.methods.saved import modules_to_save
from peftjax.methods.unipelt import unipelt

METHODS = {
    'full': full,
    'bitfit': bitfit,
    'lora': lora,
    'rslora': functools.partial(lora, rslora=True),
    'dora': functools.partial(lora, dora=True),
    'adalora': adalora.adalora,
    'ia3': ia3,
    'houlsby': functools.partial(bottleneck_adapter, train_norms=True),
    'pfeiffer': bottleneck_adapter,
    'modules_to_save': modules_to_save,
    'prompt': prompt_tuning,
    'ptuning': ptuning,
    'prefix': prefix_tuning,
    'ptuning_v2': ptuning_v2,
    'unipelt': unipelt,
}
# Method name -> (constructor kwarg, targets table key) filled from ``model_type`` when omitted.
_DEFAULT_TARGET_KWARGS = {
    'lora': (('target', 'lora'),), 'rslora': (('target', 'lora'),), 'dora': (('target', 'lora'),),
    'adalora': (('target', 'lora'),),
    'ia3': (('target', 'ia3'), ('feedforward', 'ia3_feedforward')),
    'houlsby': (('target', 'houlsby'),), 'pfeiffer': (('target', 'pfeiffer'),),
    'unipelt': (('target', 'lora'), ('attention_target', 'lora'), ('adapter_target', 'pfeiffer')),
}


def get(name: str, model_type: str | None = None, **kwargs) -> PeftMethod:
  """The method ``name`` built with ``kwargs``; targets not given default to HF PEFT's defaults
  for ``model_type`` (e.g. 'llama', 'gpt2', 'bert')."""
  if name not in METHODS:
    raise ValueError(f'unknown PEFT method {name!r}; valid names: {sorted(METHODS)}')
  if model_type is not None:
    for kwarg, key in _DEFAULT_TARGET_KWARGS.get(name, ()):
      kwargs.setdefault(kwarg, targets.default_target(key, model_type))
  return METHODS[name](**kwargs)


def from_spec(spec: Spec | dict) -> PeftMethod:
  """The method a ``Spec`` (or its ``asdict()``) describes; ``compose`` specs recurse."""
  spec = spec if isinstance(spec, Spec) else Spec.from_dict(spec)
  if spec.name == 'compose':
    return compose(*(from_spec(s) for s in spec.hparams['methods']))
  return get(spec.name, **spec.hparams)
