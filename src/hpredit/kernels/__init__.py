"""The HPR edit at kernel speed: a fused edit built once per attach, with a Triton kernel on GPUs.

No model code here: :func:`hpr_edit` turns one layer's prepared parameters (unit probe normal,
fallback axis, angle MLP) into the layer's edit ``(hidden, mask, strength) -> hidden``, the one
function HF hooks, the vLLM module and the compiled path all call; its row-wise step is the
custom op ``hpredit::hpr_rows``, which ``torch.compile`` keeps whole.
"""

from .hpr import BACKENDS, PRECISIONS, hpr_edit, hpr_rows, triton_available

__all__ = ["BACKENDS", "PRECISIONS", "hpr_edit", "hpr_rows", "triton_available"]
