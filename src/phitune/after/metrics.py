"""One definition of the teacher-forced metrics, shared by the evaluations during training and by `phitune eval`.

Over the trained (label != -100) tokens, where position t predicts token t+1:
    loss           = sum of cross-entropy / number of trained tokens   (token-weighted)
    perplexity     = exp(loss)
    token_accuracy = share of trained tokens whose argmax prediction is the label
    kl_to_teacher  = sum over trained tokens of KL(p_teacher || p_model) / number of trained tokens   (method distill)

Token-weighted sums do not depend on how rows are batched, padded or split across processes, so N processes that
each score a shard and add their sums report the loss of one process scoring everything. (The Trainer's own eval
loss is a mean of per-batch means, which changes with the batch size and the number of processes.)
"""

from __future__ import annotations

import math

import torch

STATS = ("nll_sum", "correct", "tokens")  # the columns of sequence_token_stats


def sequence_token_stats(logits: torch.Tensor, labels: torch.Tensor,
                         position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per sequence: (summed cross-entropy, correct argmax predictions, trained tokens), float64 of shape (S, 3).

    logits (B, T, V), labels (B, T). Each row of a padded batch is one sequence. A padding-free batch (one row of
    several sequences, pass its `position_ids`) is split where the positions restart at 0. Rows are scored one at a
    time so the float32 copy of the logits is one row's, not the batch's.
    """
    targets = labels[:, 1:]
    if position_ids is not None:  # packed: sequence index of each target token
        starts = (position_ids == 0).long()
        sequence_of = (starts.cumsum(-1) - 1)[:, 1:]
        count = int(starts.sum())
    else:
        sequence_of = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)
        count = labels.shape[0]
    stats = torch.zeros(count, len(STATS), dtype=torch.float64, device=logits.device)
    for row in range(logits.shape[0]):
        keep = targets[row] != -100
        row_logits = logits[row, :-1][keep].float()
        row_targets = targets[row][keep]
        nll = torch.nn.functional.cross_entropy(row_logits, row_targets, reduction="none")
        correct = (row_logits.argmax(-1) == row_targets)
        index = sequence_of[row][keep]
        stats[:, 0].index_add_(0, index, nll.double())
        stats[:, 1].index_add_(0, index, correct.double())
        stats[:, 2].index_add_(0, index, torch.ones_like(nll, dtype=torch.float64))
    return stats


def summarize(totals: torch.Tensor) -> dict:
    """loss, perplexity and token accuracy from summed (nll_sum, correct, tokens); {} when nothing was trained."""
    nll_sum, correct, tokens = (float(value) for value in totals)
    if tokens == 0:
        return {}
    loss = nll_sum / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "token_accuracy": correct / tokens, "tokens": int(tokens)}


def perplexity(loss: float) -> float:
    """exp(loss), infinite beyond exp(50) rather than an overflow."""
    return math.exp(loss) if loss < 50 else float("inf")


def answer_logps(model, sequences: list[tuple[list[int], list[int]]], pad_id: int, max_seq_length: int):
    """sum_t log p(answer_t | prompt, answer_<t) for each (prompt ids, answer ids), each sequence cut to
    max_seq_length as in training; shape (len(sequences),). The score DPO, ORPO, SimPO and KTO runs report before and
    after training (the tokens their trainers compare)."""
    rows = [(prompt + answer)[:max_seq_length] for prompt, answer in sequences]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    scored = torch.zeros_like(ids, dtype=torch.bool)  # positions holding an answer token
    for i, ((prompt, _), row) in enumerate(zip(sequences, rows)):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        scored[i, len(prompt) : len(row)] = True
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
    return (logps * scored[:, 1:].to(device)).sum(-1).cpu()


def teacher_kl_sums(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(summed KL(p_teacher || p_model), summed cross-entropy, trained tokens), float64 of shape (3,), over the
    positions that predict a trained token, at temperature 1:

        KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))   (nats; 0 when the two distributions agree)

    logits and teacher_logits (B, T, V), labels (B, T). Rows one at a time, as sequence_token_stats does."""
    targets = labels[:, 1:]
    sums = torch.zeros(3, dtype=torch.float64)
    for row in range(logits.shape[0]):
        keep = targets[row] != -100
        student = torch.log_softmax(logits[row, :-1][keep].float(), dim=-1)  # (N, V)
        teacher = torch.log_softmax(teacher_logits[row, :-1][keep].float().to(student.device), dim=-1)
        kl = (teacher.exp() * (teacher - student)).sum(-1)
        nll = -student.gather(-1, targets[row][keep][:, None]).squeeze(-1)
        sums += torch.tensor([kl.sum().item(), nll.sum().item(), kl.numel()], dtype=torch.float64)
    return sums
