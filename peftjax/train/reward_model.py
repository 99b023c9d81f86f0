"""A trained reward model as a judge: load a reward run's export, score (prompt, completion)
pairs rendered as in training, or token ids written by a policy with the same tokenizer.

>>> judge = RewardModel.load('/work/runs/reward')                  # doctest: +SKIP
>>> judge.score(['How are you?'], ['I am fine, thanks.'])          # doctest: +SKIP
array([1.93], dtype=float32)
>>> judge.score_ids(ids, mask, tokenizer=policy.tokenizer)         # doctest: +SKIP

``load`` takes a run directory (its ``merged/`` export, else ``adapter/`` on the base named in
its ``config.json``) or a merged checkpoint directory. Scores are the head's output on the last
non-pad token, as ``AutoModelForSequenceClassification`` computes them.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import data
from peftjax.methods import hf_format
from peftjax.models import auto
from peftjax.objectives import reward
from peftjax.train import tasks


@dataclasses.dataclass
class RewardModel:
  pretrained: auto.Pretrained
  method: Any       # the PEFT method; None for a merged checkpoint
  adapter: Any
  system: str | None = None   # the system turn of training (None: the template's default)
  max_length: int | None = None

  @classmethod
  def load(cls, path) -> 'RewardModel':
    path = pathlib.Path(path)
    run_config = json.loads((path / 'config.json').read_text()) \
        if (path / 'config.json').is_file() and (path / 'checkpoints').is_dir() else None
    d = (run_config or {}).get('data', {})
    kw = dict(system=d.get('system') or None, max_length=d.get('max_length'))
    if (path / 'merged').is_dir() or run_config is None:
      pre = auto.load_pretrained(path / 'merged' if run_config else path, task='classification')
      return cls(pre, None, None, **kw)
    m = run_config['model']
    pre = auto.load_pretrained(m['source'], task='classification', num_labels=1)
    method, adapter = hf_format.load_adapter(path / 'adapter', pre.params, pre.config)
    return cls(pre, method, adapter, **kw)

  @property
  def tokenizer(self):
    return self.pretrained.tokenizer

  def __post_init__(self):
    if self.pretrained.config.num_labels != 1:
      raise ValueError(f'a reward model has one output; this model has num_labels='
                       f'{self.pretrained.config.num_labels}')
    module = self.pretrained.module
    apply = (self.method.apply(module.apply) if self.method is not None else
             lambda adapter, params, *a, **kw: module.apply({'params': params}, *a, **kw))
    self._forward = jax.jit(lambda adapter, params, ids, mask: tasks.sequence_rewards(
        apply, adapter, params, ids, mask))

  def score_ids(self, input_ids, attention_mask, tokenizer=None) -> np.ndarray:
    """Rewards [batch] of token ids [batch, seq] (any padding side, mask 0 on padding).
    ``tokenizer``: the one that wrote the ids; refused (naming both) unless it matches the
    reward model's (``objectives.reward.check_tokenizers``)."""
    if tokenizer is not None:
      reward.check_tokenizers(self.tokenizer, tokenizer)
    return np.asarray(self._forward(self.adapter, self.pretrained.params,
                                    jnp.asarray(input_ids, jnp.int32),
                                    jnp.asarray(attention_mask, jnp.int32)))

  def score(self, prompts, completions, batch_size: int = 16) -> np.ndarray:
    """Rewards of plain-text ``completions`` to ``prompts``, each rendered with the chat
    template as a user turn and an assistant turn (after the training system turn), cut to the
    last ``max_length`` tokens as in training."""
    pad = self.tokenizer.pad_token_id or 0
    out = []
    for start in range(0, len(prompts), batch_size):
      rows = [data.encode_chat(self.tokenizer, data.pair_messages(p, c, self.system))[0]
              for p, c in zip(prompts[start:start + batch_size],
                              completions[start:start + batch_size])]
      rows = [r[-self.max_length:] if self.max_length else r for r in rows]
      width = -(-max(map(len, rows)) // 16) * 16   # few distinct shapes: few compilations
      ids = np.full((batch_size, width), pad, np.int32)
      mask = np.zeros((batch_size, width), np.int32)
      for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
      out.append(self.score_ids(ids, mask)[:len(rows)])
    return np.concatenate(out)
