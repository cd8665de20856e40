"""Per-step training metrics: FLOPs and MFU, console/progress bar, JSONL, TensorBoard."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from hcx.config import ModelConfig

# Dense peak TFLOP/s per device (no sparsity), by device-name substring and dtype.
# Sources: NVIDIA H100/H200 SXM and A100 datasheets.
PEAK_TFLOPS = {
    ("H100", torch.bfloat16): 989.4,
    ("H200", torch.bfloat16): 989.4,
    ("A100", torch.bfloat16): 312.0,
    ("H100", torch.float32): 494.7,  # TF32 tensor cores
    ("H200", torch.float32): 494.7,
    ("A100", torch.float32): 156.0,
}


def peak_tflops(configured: float | None, dtype: torch.dtype) -> float | None:
    """The per-device peak MFU is measured against: the recipe's value, else a
    known GPU's datasheet figure, else None (MFU not reported)."""
    if configured is not None:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for (key, dt), value in PEAK_TFLOPS.items():
            if key in name and dt == dtype:
                return value
    return None


def training_flops_per_token(model: ModelConfig, vocab_size: int, seq_length: int) -> float:
    """Model FLOPs to train on one token (forward + backward = 3x forward).

    Forward per token: 2 FLOPs per matmul weight (QKV, attention output, SwiGLU
    gate/up/down), 4*s*h per layer for the attention scores and the weighted sum
    (QK^T and AV, counted without the causal half as in Megatron-LM and PaLM), and
    2*h*V for the logits. Recomputation is not counted (model FLOPs, not hardware).
    """
    h, f, L, s = model.hidden_size, model.ffn_hidden_size, model.num_layers, seq_length
    q, kv = model.num_attention_heads * model.kv_channels, model.query_groups * model.kv_channels
    matmul_params = L * (h * (q + 2 * kv) + q * h + 3 * h * f)
    forward = 2 * matmul_params + 4 * L * s * h + 2 * h * vocab_size
    return 3.0 * forward


class MetricsLogger:
    """Writes one JSON object per step to ``metrics.jsonl`` and TensorBoard scalars;
    shows a progress bar. Only the logging rank creates one."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, tensorboard: bool,
                 progress: bool, log_every: int):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self.log_every = log_every
        self.total_steps = total_steps
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every finished step
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}" if not k.startswith("valid") else k, v, step)
        short = {k: record[k] for k in ("loss", "lr", "grad_norm") if k in record}
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in short.items()}, refresh=False)
        if step % self.log_every == 0 or step == self.total_steps:
            parts = [f"step {step}"] + [_fmt(k, record[k]) for k in
                                        ("loss", "valid/loss", "lr", "grad_norm", "tokens_per_s",
                                         "tflops", "mfu")
                                        if k in record]
            self.write(" | ".join(parts))

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


def _fmt(key: str, value: float) -> str:
    if key == "mfu":
        return f"mfu {100 * value:.1f}%"
    if key == "tokens_per_s":
        return f"{value:,.0f} tok/s"
    if key == "tflops":
        return f"{value:.3g} TFLOP/s/dev"
    return f"{key} {value:.5g}"
