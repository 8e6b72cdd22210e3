"""Micro-batches packed by completion length: the same gradient as TRL's shuffled split, for fewer positions."""

import torch
from trl.trainer.utils import split_tensor_dict

from brep_rl.grpo import main as grpo_main
from brep_rl.packing import pack_micro_batches, signal_rows
from testing_utils import grpo_args


def generation_batch() -> dict:
    """A generation batch as TRL hands it to the loss: 12 rows in groups of 4, one group whose rewards were all
    equal (advantage 0), completions of 1 to 10 tokens (right-padded to 10), prompts of 6 tokens, some left-padded."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 10, 3, 4, 2, 7, 5, 1, 9, 2, 6, 3])
    completion_mask = (torch.arange(10) < lengths[:, None]).long()
    prompt_mask = torch.ones(12, 6, dtype=torch.long)
    prompt_mask[4:8, :2] = 0
    advantages = torch.randn(12, generator=g)
    advantages[4:8] = 0.0  # a group without signal
    return {
        "prompt_ids": torch.randint(3, 1000, (12, 6), generator=g) * prompt_mask,
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(3, 1000, (12, 10), generator=g) * completion_mask,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum(),
    }


def test_packing_sorts_rows_by_length_cuts_the_padding_and_leaves_out_zero_advantage_rows():
    batch = generation_batch()
    batch["prompt_ids"][:, -1] = torch.arange(12)  # the row's id
    assert signal_rows(split_tensor_dict(batch, 3)) == 8
    batches, stats = pack_micro_batches(split_tensor_dict(batch, 3), keep_rows=3)
    assert [b["completion_mask"].sum(1).tolist() for b in batches] == [[1, 2, 3], [3, 4, 6], [9, 10]]  # the 8 with a signal
    assert [b["completion_ids"].size(1) for b in batches] == [3, 6, 10]  # each cut to its longest completion
    assert stats.rows == 8 / 12 and stats.cells == (3 * 3 + 3 * 6 + 2 * 10) / (12 * 10)
    for b in batches:
        assert b["num_items_in_batch"] is batch["num_items_in_batch"]  # the loss's normalizer: the whole batch's
        for i, row in enumerate(b["prompt_ids"][:, -1].tolist()):  # every row keeps its own values
            assert row not in range(4, 8) and b["advantages"][i] == batch["advantages"][row]
            assert torch.equal(b["completion_ids"][i], batch["completion_ids"][row, : b["completion_ids"].size(1)])
            assert torch.equal(b["prompt_mask"][i], batch["prompt_mask"][row])

    batch["advantages"][1:] = 0.0  # one row with a signal: the shortest others make up the rows asked for
    batches, stats = pack_micro_batches(split_tensor_dict(batch, 3), keep_rows=4)
    assert [b["prompt_ids"][:, -1].tolist() for b in batches] == [[0, 7], [4], [9]]
    assert stats.rows == 4 / 12
    batches, stats = pack_micro_batches(split_tensor_dict(batch, 3))  # beta > 0: every row
    assert stats.rows == 1.0 and sum(len(b["advantages"]) for b in batches) == 12


def test_the_packed_micro_batches_give_the_same_gradient_as_trls_split(tiny_model_dir, tmp_path):
    trainer = grpo_main(grpo_args(tiny_model_dir, tmp_path / "run", "--max_steps", "1", "--gradient_accumulation_steps",
                                  "3"))
    assert trainer.packing
    steer = trainer.steer
    with torch.no_grad():
        for p in steer.vectors().values():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    trainer.model.train()
    batch = generation_batch()

    def gradient(micro_batches):
        steer.zero_grad()
        for inputs in micro_batches:
            trainer._compute_loss(trainer.model, inputs).backward()
        return {name: p.grad.clone() for name, p in steer.vectors().items()}

    trl_split = gradient(split_tensor_dict(batch, 3))
    packed, stats = pack_micro_batches(split_tensor_dict(batch, 3), keep_rows=3)
    assert stats.cells < 0.5
    packed_gradient = gradient(packed)
    assert any(g.abs().sum() > 0 for g in trl_split.values())
    for name, g in trl_split.items():
        assert torch.allclose(g, packed_gradient[name], atol=1e-6, rtol=1e-4), name


def test_a_run_logs_its_packing_and_packs_only_where_it_is_exact(tiny_model_dir, tmp_path):
    trainer = grpo_main(grpo_args(tiny_model_dir, tmp_path / "run", "--max_steps", "1", "--gradient_accumulation_steps", "2"))
    logged = trainer.state.log_history[0]
    assert 0 < logged["packing/rows"] <= 1 and 0 < logged["packing/cells"] <= 1
    per_sequence = grpo_main(grpo_args(tiny_model_dir, tmp_path / "grpo_loss", "--max_steps", "1", "--loss_type", "grpo"))
    assert not per_sequence.packing and "packing/rows" not in per_sequence.state.log_history[0]
    off = grpo_main(grpo_args(tiny_model_dir, tmp_path / "off", "--max_steps", "1", "--pack_micro_batches", "false"))
    assert not off.packing
