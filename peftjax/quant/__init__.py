"""Block-wise quantisation of frozen base weights (QLoRA): NF4, FP4, int4, int8, double
quantisation (``formats``), and the quantised-kernel pytree type with its helpers (``kernel``).

>>> import numpy as np
>>> q = quantize_kernel(np.ones((64, 8), np.float32), 'int8', block_size=64, double_quant=False)
>>> q.qtype, q.shape, q.nbytes     # 512 codes + 8 float32 absmax
('int8', (64, 8), 544)
"""
from peftjax.quant.formats import TABLES, check_type
from peftjax.quant.kernel import (QuantConfig, QuantizedKernel, dequantize_params, is_quantized,
                                  kernel_shardings, nbytes, quantize_kernel, quantize_params,
                                  require_float, shardings, stack, value)

TYPES = tuple(TABLES)
