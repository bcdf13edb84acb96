"""Adapter dropout keyed by (seed, step, sample): how a batch is split leaves the update unchanged."""

from __future__ import annotations

import pytest
import torch

from perft.adapters import AdapterExperts
from perft.dropout import DropoutKeys, keyed_dropout
from tests.helpers.training import adapter_tensors, config, make_workspace, max_abs_diff


def test_masks_follow_the_sample_not_its_batch_or_padding():
    right = DropoutKeys.build(7, 3, [11, 5], torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    left_alone = DropoutKeys.build(7, 3, [11], torch.tensor([[0, 1, 1, 1]]))
    a = right.keep_mask(2, 64, 0.5, torch.float32, torch.device("cpu")).view(2, 5, 64)
    b = left_alone.keep_mask(2, 64, 0.5, torch.float32, torch.device("cpu")).view(1, 4, 64)
    assert torch.equal(a[0, :3], b[0, 1:])  # sample 11, padded right among others or left alone
    assert (a[0, 3:] == 2).all() and (b[0, 0] == 2).all()  # padding keeps everything (scaled by 1 / (1 - p))
    for other in (DropoutKeys.build(7, 4, [11], torch.ones(1, 3)), DropoutKeys.build(8, 3, [11], torch.ones(1, 3))):
        assert not torch.equal(other.keep_mask(2, 64, 0.5, torch.float32, torch.device("cpu")), a[0, :3])  # step, seed
    assert not torch.equal(right.keep_mask(3, 64, 0.5, torch.float32, torch.device("cpu")).view(2, 5, 64), a)  # block
    keep = DropoutKeys.build(0, 0, range(64), torch.ones(64, 32)).keep_mask(0, 256, 0.25, torch.float32,
                                                                            torch.device("cpu"))
    assert keep.unique().tolist() == [0.0, pytest.approx(4 / 3)]
    assert (keep == 0).float().mean().item() == pytest.approx(0.25, abs=0.005)  # 524288 draws


def test_hidden_site_masks_differ_per_expert_and_block():
    ex = AdapterExperts("parallel", 4, 16, 8, dropout=0.5).train()
    other = AdapterExperts("parallel", 4, 16, 8, dropout=0.5).train()
    model = torch.nn.ModuleList([ex, other])
    with torch.no_grad():
        ex.up.fill_(1.0)
        other.load_state_dict(ex.state_dict())
    x = torch.randn(6, 16)
    with keyed_dropout(model, seed=1, step=0, sample_ids=[0, 1], attention_mask=torch.ones(2, 3)):
        mask = ex.dropout_keys.keep_mask(ex.dropout_salt, 32, 0.5, torch.float32, x.device).view(6, 4, 8)
        y1, y2, y1_again = ex(x), other(x), ex(x)
    assert torch.equal(y1, y1_again) and not torch.equal(y1, y2)  # keyed, and drawn per block
    assert not torch.equal(mask[:, 0], mask[:, 1])  # each expert draws its own
    with torch.no_grad():
        h = torch.einsum("nrd,td->tnr", ex.down, x) * mask
        expected = torch.einsum("ndr,tnr->td", ex.up, torch.nn.functional.silu(h))
    torch.testing.assert_close(y1, expected)


@pytest.mark.parametrize("adapter", ["lora", "parallel"])
def test_one_step_is_the_same_for_1x16_and_4x4_with_dropout_on(tmp_path, adapter):
    from perft.training import train

    ws = make_workspace(tmp_path / "ws", n_records=40)
    runs = {}
    # Two steps, so that every adapter tensor has moved under a dropout mask. The balance losses
    # are off: a Switch loss per micro-batch depends on the split by its definition.
    for name, micro, dropout in (("1x16", 16, 0.3), ("4x4", 4, 0.3), ("no_dropout", 16, 0.0)):
        cfg = config(ws, tmp_path / name, adapter=adapter, batch_size=16, micro_batch_size=micro, dropout=dropout,
                     max_steps=2, warmup_steps=0, val_set_size=0, lr=1e-2, router_aux_loss_coef=0.0,
                     base_router_aux_loss_coef=0.0)
        runs[name] = adapter_tensors(train(cfg).adapter_dir)
    # Rounding only (measured about 1e-7; AdamW's first steps divide by |g| and can blow a
    # rounding difference of a near-zero gradient up towards 1e-5).
    assert max_abs_diff(runs["1x16"], runs["4x4"]) < 1e-4
    assert max_abs_diff(runs["1x16"], runs["no_dropout"]) > 1e-3  # dropout was on and mattered
