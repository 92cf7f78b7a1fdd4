"""One DreamBooth training step: the loss of a batch, and the whole step captured once as a CUDA graph and replayed.

An eager SD 1.5 LoRA step launches about 13,000 kernels and is bound by launch overhead, not arithmetic. Replaying a
captured graph launches the same work with one call, so the step costs what the GPU needs. The graph holds the text
encoder, UNet, loss, backward, master-weight copies, gradient clipping and the fused AdamW update; the loop copies each
step's latents, noise, timesteps, target, loss weights, Huber thresholds and SDXL size ids into static buffers and replays it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from dreamlora.models import PromptEmbeddings

log = logging.getLogger(__name__)


def dreambooth_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    n_instance: int,
    prior_weight: float,
    weights: torch.Tensor | None = None,
    loss: str = "l2",
    huber_c: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-example loss averaged over the instance half plus `prior_weight` x over the class half (rows after `n_instance`), in fp32.

    `loss`: l2 (squared error), l1, or the pseudo-Huber losses with a threshold c per row (`huber_c`, from `train.huber_thresholds`):
    huber 2c(sqrt(d^2 + c^2) - c), which is d^2 for small errors and 2c|d| for large ones, and smooth_l1 2(sqrt(d^2 + c^2) - c).
    `weights` (one per row, e.g. from `train.snr_weights`) scale each example's loss before each half is averaged.
    `mask` (rows, 1, h, w) in [0, 1] weights each latent position before the mean (--masked-loss: as kohya, not renormalised).
    """
    diff = pred.float() - target.float()
    if loss == "l2":
        elementwise = diff.square()
    elif loss == "l1":
        elementwise = diff.abs()
    else:
        if huber_c is None:
            raise ValueError(f"the {loss} loss needs a threshold per row (huber_c)")
        c = huber_c.float().view(-1, *[1] * (diff.dim() - 1))
        elementwise = (diff.square() + c.square()).sqrt() - c
        elementwise = 2 * c * elementwise if loss == "huber" else 2 * elementwise
    if mask is not None:
        elementwise = elementwise * mask.float()
    per_example = elementwise.flatten(1).mean(dim=1)
    if weights is not None:
        per_example = per_example * weights.float()
    instance_loss = per_example[:n_instance].mean()
    if pred.shape[0] == n_instance:
        return instance_loss, instance_loss, torch.zeros_like(instance_loss)
    prior_loss = per_example[n_instance:].mean()
    return instance_loss + prior_weight * prior_loss, instance_loss, prior_loss


def batch_loss(
    unet: torch.nn.Module,
    context_fn: Callable[[], torch.Tensor | PromptEmbeddings],
    rows: torch.Tensor,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    target: torch.Tensor,
    n_instance: int,
    prior_weight: float,
    weight_dtype: torch.dtype,
    weights: torch.Tensor | None = None,
    size_ids: torch.Tensor | None = None,
    added_conditioning: Callable[[PromptEmbeddings, torch.Tensor], dict[str, torch.Tensor] | None] | None = None,
    loss: str = "l2",
    huber_c: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predict with the UNet conditioned on each row's prompt and return (loss, instance loss, prior loss).

    `context_fn` gives the encoded distinct prompts (a context tensor, or `PromptEmbeddings` with SDXL's pooled text);
    `added_conditioning` (`ModelFamily.added_conditioning`) turns each row's embeddings and `size_ids` (rows, 6) into the
    UNet's `added_cond_kwargs` (SDXL), or None for families without them.
    """
    # Each distinct prompt is encoded once and indexed by row: gradients still reach every row.
    embeddings = context_fn()
    embeddings = (embeddings if isinstance(embeddings, PromptEmbeddings) else PromptEmbeddings(embeddings)).select(rows)
    added = added_conditioning(embeddings, size_ids) if added_conditioning is not None else None
    added = {key: value.to(weight_dtype) for key, value in added.items()} if added else None
    pred = unet(noisy.to(weight_dtype), timesteps, embeddings.context.to(weight_dtype), added_cond_kwargs=added).sample
    return dreambooth_loss(pred, target, n_instance, prior_weight, weights, loss, huber_c, mask)


class CudaGraphStep:
    """The full optimizer step as one CUDA graph; `__call__` copies inputs into static buffers and replays it.

    Requirements (checked by the caller): one CUDA process, no gradient accumulation, no loss scaling (bf16 or fp32),
    a fused AdamW built with `capturable=True` and tensor learning rates, fixed batch shapes.
    A non-finite loss skips the AdamW update inside the graph (`found_inf`), without a host sync; device-side
    counters (`skip_counts`) keep the skipped steps, the current run of them and the longest run, read at log steps.
    """

    def __init__(
        self,
        loss_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float,
        masters: Any | None = None,
        on_first_backward: Callable[[], None] | None = None,
    ) -> None:
        self.loss_fn, self.params, self.optimizer, self.max_grad_norm = loss_fn, params, optimizer, max_grad_norm
        self.masters = masters
        self.on_first_backward = on_first_backward
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_seconds = 0.0

    def _trained(self) -> list[torch.nn.Parameter]:
        return [p for ps in self.masters.masters.values() for p in ps] if self.masters else self.params

    def _body(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch._foreach_zero_([p.grad for p in self.params])
        loss, instance_loss, prior_loss = self.loss_fn(*inputs)
        loss.backward()
        if self.on_first_backward is not None:
            self.on_first_backward()
            self.on_first_backward = None
        if self.masters:
            for name, ps in self.masters.params.items():
                torch._foreach_copy_([m.grad for m in self.masters.masters[name]], [p.grad for p in ps])
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._trained(), self.max_grad_norm, foreach=True)
        self.found_inf.copy_((~torch.isfinite(loss)).float())
        self.skipped.add_(self.found_inf)
        self.streak.add_(1.0).mul_(self.found_inf)  # consecutive non-finite steps; 0 after a finite one
        torch.maximum(self.worst_streak, self.streak, out=self.worst_streak)
        self.optimizer.step()
        if self.masters:
            self.masters.masters_to_model()
        return loss.detach(), instance_loss.detach(), prior_loss.detach()

    def arm(self, device: torch.device) -> None:
        """The flag the fused AdamW reads, zeroed counters, and every gradient allocated: what the graph captures."""
        self.found_inf = torch.zeros((), device=device)  # 0-dim, as GradScaler passes it
        self.optimizer.found_inf = self.found_inf  # read by the fused AdamW kernel: skip the update on a non-finite loss
        self.skipped, self.streak, self.worst_streak = (torch.zeros((), device=device) for _ in range(3))
        self._prepare_grads()

    def skip_counts(self) -> tuple[int, int, int]:
        """(steps skipped for a non-finite loss, the current run of them, the longest run) since capture; syncs."""
        return int(self.skipped.item()), int(self.streak.item()), int(self.worst_streak.item())

    def _prepare_grads(self) -> None:
        """Allocate every gradient once, so the graph reads and writes fixed memory."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.masters:
            for ps in self.masters.masters.values():
                for m in ps:
                    if m.grad is None:
                        m.grad = torch.zeros_like(m)

    def capture(self, inputs: tuple[torch.Tensor, ...], warmup: int = 3) -> None:
        """Warm up on a side stream, restore every trained tensor and optimizer state, then capture."""
        started = time.perf_counter()
        self.static_inputs = tuple(t.clone() for t in inputs)
        self.arm(inputs[0].device)
        trained = [p for p in self.params] + ([m for ps in self.masters.masters.values() for m in ps] if self.masters else [])
        snapshot = [t.detach().clone() for t in trained]
        saved_state = {p: {k: v.clone() for k, v in state.items() if torch.is_tensor(v)} for p, state in self.optimizer.state.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._body(self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        # Warm-up steps must not count: put weights and optimizer state back as they were.
        with torch.no_grad():
            for t, saved in zip(trained, snapshot):
                t.copy_(saved)
            for p, state in self.optimizer.state.items():
                for key, value in state.items():
                    if torch.is_tensor(value):
                        value.copy_(saved_state[p][key]) if p in saved_state else value.zero_()  # fresh AdamW state is all zeros
            for counter in (self.skipped, self.streak, self.worst_streak):
                counter.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = self._body(self.static_inputs)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.graph is None:
            self.capture(inputs)
        for static, value in zip(self.static_inputs, inputs):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.static_outputs
