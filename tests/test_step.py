"""The graphed step's body (what a CUDA graph captures) equals the eager step, including the in-graph skip of a non-finite loss."""

import torch

from dreamlora.config import AdapterConfig
from dreamlora.lora import attach_adapters, trainable_parameters
from dreamlora.models import encode_prompt, load_components, tokenize
from dreamlora.step import CudaGraphStep, batch_loss
from dreamlora.train import MasterWeights


def _adapted():
    torch.manual_seed(0)
    components = load_components("tiny")
    attach_adapters(components.unet, components.text_encoder, AdapterConfig(rank=4, init="nonzero"))
    groups = {"unet": trainable_parameters(components.unet), "text_encoder": trainable_parameters(components.text_encoder)}
    return components, groups


def _inputs():
    generator = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(3):
        noisy, target = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 4, 16, 16, generator=generator)
        steps.append((torch.tensor([0, 1]), noisy, torch.tensor([100, 700]), target, torch.ones(2)))
    steps[1] = (steps[1][0], steps[1][1] * float("nan"), *steps[1][2:])  # a non-finite step in the middle
    return steps


def _loss_fn(components, dtype=torch.float32):
    ids = tokenize(components.tokenizer, ["a photo of sks dog", "a photo of dog"])
    return lambda rows, noisy, t, target, w: batch_loss(components.unet, lambda: encode_prompt(components.text_encoder, ids), rows, noisy, t, target, 1, 1.0, dtype, w)


def test_graph_body_equals_the_eager_step_and_skips_non_finite_updates() -> None:
    results, losses = [], []
    for mode in ("graph body", "eager"):
        components, groups = _adapted()
        params = [p for ps in groups.values() for p in ps]
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
        loss_fn = _loss_fn(components)
        seen = []
        if mode == "graph body":
            step = CudaGraphStep(loss_fn, params, optimizer, max_grad_norm=1.0)
            step.arm(torch.device("cpu"))
            seen = [step._body(inputs)[0].item() for inputs in _inputs()]
            assert step.skip_counts() == (1, 0, 1)  # one skipped step, the run of them ended, longest run 1
        else:
            for inputs in _inputs():
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(*inputs)[0]
                seen.append(loss.item())
                if torch.isfinite(loss):
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
        losses.append(seen)
        results.append([p.detach().clone() for p in params])
    assert losses[0][0] == losses[1][0] and losses[0][2] == losses[1][2]
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert all(torch.isfinite(p).all() for p in results[0])


def test_graph_body_with_bf16_master_weights_updates_the_masters() -> None:
    components, groups = _adapted()
    for model in (components.unet, components.text_encoder):
        model.to(torch.bfloat16)
    masters = MasterWeights(groups, torch.bfloat16)
    before = [m.detach().clone() for ps in masters.masters.values() for m in ps]
    params = [p for ps in groups.values() for p in ps]
    optimizer = torch.optim.AdamW([m for ps in masters.masters.values() for m in ps], lr=1e-3, fused=True)
    step = CudaGraphStep(_loss_fn(components, torch.bfloat16), params, optimizer, 1.0, masters)
    step.arm(torch.device("cpu"))
    inputs = _inputs()[0]
    step._body((inputs[0], inputs[1].bfloat16(), inputs[2], inputs[3], inputs[4]))
    after = [m.detach() for ps in masters.masters.values() for m in ps]
    assert all(m.dtype == torch.float32 for m in after) and all(p.dtype == torch.bfloat16 for p in params)
    assert sum(int(not torch.equal(a, b)) for a, b in zip(before, after)) == len(after)  # every master moved
    model_now = [p.detach().float() for p in params]
    assert all(torch.allclose(p, m, atol=1e-2, rtol=1e-2) for p, m in zip(model_now, after))  # bf16 copies follow the masters


def test_graph_body_counts_runs_of_non_finite_steps_on_the_device() -> None:
    """What train() reads at log steps to stop after MAX_BAD_STEPS non-finite steps in a row, without a per-step sync."""
    components, groups = _adapted()
    params = [p for ps in groups.values() for p in ps]
    step = CudaGraphStep(_loss_fn(components), params, torch.optim.AdamW(params, lr=1e-3, fused=True), max_grad_norm=1.0)
    step.arm(torch.device("cpu"))
    good, bad = _inputs()[0], _inputs()[1]
    counts = []
    for inputs in (bad, bad, good, bad, bad, bad, good):
        step._body(inputs)
        counts.append(step.skip_counts())
    assert counts == [(1, 1, 1), (2, 2, 2), (2, 0, 2), (3, 1, 2), (4, 2, 2), (5, 3, 3), (5, 0, 3)]
