"""The ``configs/sft.py`` QLoRA variant end to end on the real SmolLM2 (NF4 base, LoRA on all
linear layers): it trains, and its adapter is a HF PEFT LoRA of the float model."""
import json

import pytest

from peftjax.methods import hf_format
from peftjax.train import loop


@pytest.mark.slow
def test_qlora_runlocal_trains_and_exports_a_hf_peft_adapter(tmp_path):
  from configs import sft
  c = sft.get_config('method=lora,qlora,runlocal')
  c.data.update(batch_size=8, eval_batch_size=8)   # the tests run on 8 fake devices
  assert (c.model.quantize, c.model.block_size, c.model.double_quant) == ('nf4', 64, True)
  final = loop.run(c, tmp_path)
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  evals = [l['loss'] for l in lines if l['split'] == 'eval']
  train = [l['loss'] for l in lines if l['split'] == 'train']
  # Measured: train loss 4.374 (step 2) -> 3.291 (4) -> 2.610 (6); final eval loss 3.798.
  assert evals[-1] < evals[0] and train[-1] < train[0] and final['loss'] == evals[-1]
  adapter = tmp_path / 'adapter'
  hf = json.loads((adapter / hf_format.CONFIG_FILE).read_text())
  assert hf['peft_type'] == 'LORA' and sorted(hf['target_modules']) == [
      'down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']
  base = json.loads((adapter / hf_format.BASE_FILE).read_text())
  assert base['quantization'] == [dict(qtype='nf4', block_size=64, double_quant=True)]
