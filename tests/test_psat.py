import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.models.losses import AlignmentLoss, gather_batch, symmetric_infonce
from training.models.psat import PSAT, LinearProjector, PSATConfig

TINY = dict(in_dim=16, width=32, num_queries=8, num_layers=1, num_heads=4, out_dim=24, grid=32)


def _psat(**kw) -> PSAT:
    return PSAT(PSATConfig(**{**TINY, **kw}))


def test_psat_shapes_and_zero_pspe():
    torch.manual_seed(0)
    m = _psat()
    assert m.pspe.shape == (3, 32, 32)
    assert torch.count_nonzero(m.pspe) == 0
    out = m(torch.randn(4, 10, 16), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 5, 31, 7]))
    assert out.shape == (4, 24)
    # Zero init: at step 0 the slice position cannot change the output.
    tokens = torch.randn(2, 10, 16)
    a = m(tokens, torch.tensor([0, 0]), torch.tensor([0, 0]))
    b = m(tokens, torch.tensor([2, 1]), torch.tensor([9, 30]))
    torch.testing.assert_close(a, b)


def test_pspe_gradient_only_at_sampled_rows():
    torch.manual_seed(0)
    m = _psat()
    out = m(torch.randn(2, 10, 16), torch.tensor([0, 2]), torch.tensor([5, 10]))
    out.pow(2).sum().backward()
    g = m.pspe.grad
    nonzero_rows = {tuple(rc) for rc in torch.nonzero(g.abs().sum(-1)).tolist()}
    assert nonzero_rows == {(0, 5), (2, 10)}


def test_pspe_changes_output_once_trained():
    torch.manual_seed(0)
    m = _psat()
    with torch.no_grad():
        m.pspe[1, 3].normal_()
    tokens = torch.randn(1, 10, 16)
    a = m(tokens, torch.tensor([1]), torch.tensor([3]))
    b = m(tokens, torch.tensor([1]), torch.tensor([4]))
    assert not torch.allclose(a, b)


def test_no_pspe_ablation():
    torch.manual_seed(0)
    m = _psat(use_pspe=False)
    assert m.pspe is None
    assert not any("pspe" in n for n, _ in m.named_parameters())
    tokens = torch.randn(2, 10, 16)
    torch.testing.assert_close(m(tokens), m(tokens, torch.tensor([1, 2]), torch.tensor([3, 4])))
    with pytest.raises(ValueError):
        _psat()(tokens)  # with pspe, plane and index are required


def test_linear_projector():
    p = LinearProjector(16, 24)
    assert p(torch.randn(3, 10, 16)).shape == (3, 24)
    assert sum(t.numel() for t in p.parameters()) == 16 * 24 + 24


def test_infonce_symmetric_and_known_values():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    s = torch.tensor(10.0)
    torch.testing.assert_close(symmetric_infonce(a, b, s), symmetric_infonce(b, a, s))
    # Identical embeddings for every sample: chance level, log(B).
    same = torch.ones(6, 8) / math.sqrt(8)
    torch.testing.assert_close(symmetric_infonce(same, same, s), torch.tensor(math.log(6)))
    # Orthogonal, perfectly matched pairs at scale 100: ~0.
    eye = torch.eye(6, 8)
    assert symmetric_infonce(eye, eye, torch.tensor(100.0)) < 1e-30 + 1e-6

    loss = AlignmentLoss()
    v, i = torch.randn(6, 8), torch.randn(6, 8)
    torch.testing.assert_close(loss(v, image=i)["loss"], loss(i, image=v)["loss"])
    both = loss(v, image=i, text=b)
    torch.testing.assert_close(both["loss"], both["image_loss"] + both["text_loss"])
    assert torch.isfinite(both["loss"])
    weighted = AlignmentLoss(image_weight=0.5, text_weight=2.0)(v, image=i, text=b)
    torch.testing.assert_close(weighted["loss"], 0.5 * both["image_loss"] + 2.0 * both["text_loss"])


def test_temperature_learnable_and_clamped_after_the_step_not_in_forward():
    loss = AlignmentLoss(init_temperature=0.07)
    assert loss.logit_scale.requires_grad
    torch.testing.assert_close(loss.scale(), torch.tensor(1 / 0.07))
    v = torch.randn(4, 8, requires_grad=True)
    loss(v, image=torch.randn(4, 8), text=torch.randn(4, 8))["loss"].backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad != 0
    # Out of range: forward still gives a gradient (a clamp there would zero it for good) ...
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(1000.0))
    loss.logit_scale.grad = None
    out = loss(torch.randn(4, 8), image=torch.randn(4, 8))
    out["loss"].backward()
    assert out["logit_scale"].item() == pytest.approx(1000.0) and loss.logit_scale.grad != 0
    # ... and the trainer's clamp_ after the optimizer step brings it back to 100.
    loss.clamp_()
    assert loss.scale().item() == pytest.approx(100.0)
    frozen = AlignmentLoss(learnable=False)
    assert list(frozen.parameters()) == [] and "logit_scale" in frozen.state_dict()


def test_duplicates_are_positives_not_negatives():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    s = torch.tensor(10.0)
    # no duplicates: exactly the usual loss
    torch.testing.assert_close(symmetric_infonce(a, b, s, torch.eye(6, dtype=torch.bool)), symmetric_infonce(a, b, s))
    loss = AlignmentLoss()
    text = torch.randn(6, 8)
    text[1] = text[0]  # the same caption twice (template captions repeat)
    image = torch.randn(6, 8)
    image[4] = image[3]  # the same slice image twice
    # A perfect model (each volume on its own slice's embeddings) loses ~nothing once duplicates
    # count as positives; the old loss (every off-diagonal pair a negative) keeps >= log 2 on them.
    loss.logit_scale.data.fill_(math.log(100.0))
    v = torch.nn.functional.normalize(text, dim=-1)
    assert loss(v, text=text)["loss"].item() < 1e-3
    old = symmetric_infonce(v, v, loss.scale())
    assert old.item() > 2 * 2 * math.log(2) / (2 * 6) - 1e-3
    vi = torch.nn.functional.normalize(image, dim=-1)
    assert loss(vi, image=image)["loss"].item() < 1e-3
    # every sample a duplicate of every other: nothing to tell apart, loss 0
    same = torch.ones(4, 8)
    assert loss(torch.randn(4, 8), image=same)["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_loss_decreases_on_toy_problem():
    torch.manual_seed(0)
    x = torch.randn(16, 12)
    image, text = torch.randn(16, 8), torch.randn(16, 8)
    model = torch.nn.Linear(12, 8)
    loss_fn = AlignmentLoss()
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=0.05)
    losses = []
    for _ in range(30):
        loss = loss_fn(model(x), image=image, text=text)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_gather_is_identity_without_distributed():
    x = torch.randn(3, 4)
    assert gather_batch(x) is x


def _setup():
    torch.manual_seed(0)
    return _psat(), AlignmentLoss()


def _batch(n=8):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(n, 10, 16, generator=g),
        torch.randint(0, 3, (n,), generator=g),
        torch.randint(0, 32, (n,), generator=g),
        torch.randn(n, 24, generator=g),
        torch.randn(n, 24, generator=g),
    )


def _step(model, loss_fn, batch):
    tokens, plane, index, image, text = batch
    out = loss_fn(model(tokens, plane, index), image=image, text=text)
    out["loss"].backward()
    return out["loss"].detach()


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, loss_fn = _setup()
        n = _batch()[0].shape[0] // world
        local = tuple(t[rank * n : (rank + 1) * n] for t in _batch())
        loss = _step(model, loss_fn, local)
        # What DistributedDataParallel's default hook does after backward (all-reduce, then
        # divide by world size); done by hand because constructing DDP costs ~7 s on 2 cores.
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        grads["logit_scale"] = loss_fn.logit_scale.grad.clone()
        torch.save({"loss": loss, "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)

    model, loss_fn = _setup()
    loss = _step(model, loss_fn, _batch())
    grads = {k: p.grad for k, p in model.named_parameters()}
    grads["logit_scale"] = loss_fn.logit_scale.grad

    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], loss, rtol=0, atol=1e-5)
        assert got["grads"].keys() == grads.keys()
        for k, g in grads.items():
            # The rank average is the global-batch gradient because gather_batch scales the
            # local gradient by the world size; logit_scale needs no averaging at all.
            torch.testing.assert_close(got["grads"][k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
