"""The SFT loss mask: prompt-token targets contribute no loss and no gradient; assistant targets do.

The loss depends on the model only through the logits, so equal loss and equal gradient with
respect to the logits means equal gradients for every parameter. No process group: the
vocab-parallel log-probs run as a single rank.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.chat_data import collate_sft
from trainer.config import RunConfig
from trainer.stages.sft import SftStage

VOCAB = 32


def conversation() -> dict:
    # <s> <|user|> u u <|end|> <|assistant|> a a a <|end|> </s> as the chat template lays it out
    ids = np.array([2, 5, 11, 12, 7, 6, 20, 21, 22, 7, 3])
    mask = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1], dtype=np.int8)
    return {"input_ids": ids, "loss_mask": mask}


def loss_and_grad(labels: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor):
    logits = logits.clone().requires_grad_(True)
    stage = SftStage(RunConfig(stage="sft"))
    loss_sum, count, _ = stage.loss(logits, {"labels": labels, "loss_mask": mask})
    (loss_sum / count).backward()
    return float(loss_sum / count), logits.grad


@pytest.fixture
def batch():
    b = collate_sft([conversation()], None, pad_id=0)
    torch.manual_seed(0)
    logits = torch.randn(1, b.tokens.shape[1], VOCAB)
    return torch.from_numpy(b.labels), torch.from_numpy(b.loss_mask), logits


def test_prompt_targets_change_neither_loss_nor_gradient(batch) -> None:
    labels, mask, logits = batch
    prompt = (mask[0] == 0).nonzero().flatten()
    assert len(prompt) >= 5  # the targets of <|user|> u u <|end|> <|assistant|> (and padding)
    loss, grad = loss_and_grad(labels, mask, logits)
    perturbed = labels.clone()
    perturbed[0, prompt] = (perturbed[0, prompt] + 9) % VOCAB
    loss2, grad2 = loss_and_grad(perturbed, mask, logits)
    assert loss2 == loss
    assert torch.equal(grad2, grad)
    assert grad[0, prompt].abs().max() == 0


def test_an_assistant_target_changes_loss_and_gradient(batch) -> None:
    labels, mask, logits = batch
    loss, grad = loss_and_grad(labels, mask, logits)
    first = int((mask[0] == 1).nonzero()[0])
    perturbed = labels.clone()
    perturbed[0, first] = (perturbed[0, first] + 9) % VOCAB
    loss2, grad2 = loss_and_grad(perturbed, mask, logits)
    assert loss2 != pytest.approx(loss, abs=1e-6)
    assert not torch.allclose(grad2, grad)


def test_loss_is_mean_over_assistant_tokens(batch) -> None:
    labels, mask, logits = batch
    loss, _ = loss_and_grad(labels, mask, logits)
    logps = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    expected = -(logps * mask).sum() / mask.sum()
    assert loss == pytest.approx(float(expected), abs=1e-6)
    assert int(mask.sum()) == 5  # a a a <|end|> </s>
