"""Evaluation: the base and the fine-tuned model side by side, on the held-out conversations of a run.

Two kinds of metric, because they fail differently:
- teacher-forced, on every eval conversation: loss = mean cross-entropy over the trained (assistant) tokens, the
  same tokens and masks as training (phitune.data renders and masks them), perplexity = exp(loss), and token
  accuracy = share of those tokens where the argmax prediction is the label;
- generated, on up to N conversations: the model answers the last user turn (greedy) and the answer is compared
  with the reference assistant turn by ROUGE-L F1 (longest common subsequence of words) and exact match (after
  lower-casing and collapsing whitespace).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from phitune.after.generate import SamplingSettings
from phitune.config.schema import DataConfig, ModelConfig
from phitune.errors import PhituneError, replacing

EVAL_JSON = "eval.json"
REPORT_MD = "report.md"
CHART_PNG = "eval.png"
QUICK_LOOK = (5, 32)  # (--num-generate, --max-new-tokens) the advice suggests for a first look
ADVISE_ABOVE_S = 120.0  # a CPU evaluation estimated longer than this comes with advice on shortening it

log = logging.getLogger("phitune")


@dataclass
class EvalResult:
    """Metrics per model ("base", "fine-tuned", or "model" alone), sample generations, and where files went;
    `benchmarks`: lm-eval tasks' scores per model with their versions and example counts (phitune.after.benchmarks)."""

    metrics: dict[str, dict[str, float]]
    samples: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    output_dir: Path | None = None
    benchmarks: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        found = {"metrics": self.metrics, "info": self.info, "samples": self.samples}
        return {**found, "benchmarks": self.benchmarks} if self.benchmarks else found


def run_evaluation(model_cfg: ModelConfig, adapter: Path | None, data_cfg: DataConfig, output_dir: Path,
                   num_generate: int = 50, settings: SamplingSettings | None = None,
                   batch_size: int = 8, use_eval_split: bool = True) -> EvalResult:
    """Evaluate the base model (and base + adapter when an adapter is given); write eval.json, report.md, eval.png."""
    from phitune.after.generate import attach_adapter, load_for_inference
    from phitune.after.report import plot_eval_chart, write_eval_markdown

    settings = settings or SamplingSettings(max_new_tokens=64)
    conversations = eval_conversations(data_cfg, use_eval_split)
    model, tokenizer = load_for_inference(model_cfg)
    tokenized = tokenize_eval_set(conversations, tokenizer, data_cfg)
    prompts, references = split_prompts(conversations[:num_generate], tokenizer)
    metrics, answers = {}, {}
    names = ("base", "fine-tuned") if adapter is not None else ("model",)
    estimate = None
    if model.device.type == "cpu":  # minutes to hours at Phi-3-mini's size: say so before, not after
        estimate = announce_eval_time(model, tokenized, len(prompts), settings.max_new_tokens, batch_size, len(names))
    started = time.perf_counter()
    for name in names:
        if name == "fine-tuned":
            model = attach_adapter(model, adapter).eval()
        metrics[name] = teacher_forced_metrics(model, tokenizer, tokenized, batch_size)
        answers[name] = _generate(model, tokenizer, prompts, settings, batch_size)
        metrics[name].update(generation_metrics(answers[name], references))
    if estimate is not None:  # the estimate's own check, in front of the user
        log.info("evaluation took %s (estimated %s)", _duration(time.perf_counter() - started), _duration(estimate))
    samples = [dict(prompt=p[-1]["content"], reference=r, **{n: answers[n][i] for n in names})
               for i, (p, r) in enumerate(zip(prompts, references))]
    info = dict(model=model_cfg.name_or_path, adapter=str(adapter) if adapter else None,
                eval_examples=len(tokenized[0]),
                generated=len(prompts), max_new_tokens=settings.max_new_tokens, quantized=bool(model_cfg.quantization))
    result = EvalResult(metrics=metrics, samples=samples, info=info, output_dir=Path(output_dir))
    written = replace(result, benchmarks=save_eval_json(result))  # the report keeps earlier benchmarks too
    plot_eval_chart(metrics, result.output_dir / CHART_PNG, written.benchmarks)
    write_eval_markdown(written, result.output_dir / REPORT_MD, CHART_PNG)
    return result


def read_eval_json(out: Path) -> dict:
    """The eval.json an earlier `phitune eval` left in `out` ({} when there is none)."""
    if not (out / EVAL_JSON).is_file():
        return {}
    try:
        return json.loads((out / EVAL_JSON).read_text(encoding="utf-8"))
    except ValueError:
        raise PhituneError(f"{out / EVAL_JSON} is not valid JSON; move it away or choose --output") from None


def save_eval_json(result: EvalResult) -> dict:
    """Write `result` to eval.json in its output_dir, keeping the lm-eval benchmarks an earlier `phitune eval
    --benchmarks` wrote there (a benchmark of the same name is replaced): each kind of evaluation keeps the other's
    results, whichever runs last. Return the benchmarks written."""
    earlier = read_eval_json(result.output_dir).get("benchmarks") or {}
    benchmarks = {**earlier, **result.benchmarks}
    result.output_dir.mkdir(parents=True, exist_ok=True)
    saved = replace(result, benchmarks=benchmarks).to_dict()
    with replacing(result.output_dir / EVAL_JSON) as path:  # a full disk keeps the earlier eval.json whole
        path.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
    return benchmarks


def announce_eval_time(model, tokenized: tuple[list, list], num_generate: int, max_new_tokens: int,
                       batch_size: int, n_models: int, advise_above_s: float = ADVISE_ABOVE_S) -> float:
    """Log how long the evaluation will take on this machine and, when long, how to shorten it; return seconds.

    A forward pass costs about fixed + per_token x tokens (fixed: reading every weight once), measured on two short
    inputs; a decoding step of a batch is timed on model.generate itself (on a small model its per-step work beyond
    the forward pass dominates). The evaluation is then, per model, the teacher-forced batches plus, per generation
    batch, a prefill and max_new_tokens decoding steps: an upper bound, as answers that end early stop sooner."""
    fixed_s, per_token_s = forward_cost(model, batch_size)
    step_s = decoding_step_cost(model, batch_size)
    lengths = [len(ids) for ids in tokenized[0]]

    def seconds(n_generate: int, new_tokens: int) -> float:
        scored = sum(fixed_s + per_token_s * len(lengths[i : i + batch_size]) * max(lengths[i : i + batch_size])
                     for i in range(0, len(lengths), batch_size))
        prompt = max(lengths[:n_generate], default=0)  # the whole conversation: a bound on its prompt
        batches = [min(batch_size, n_generate - i) for i in range(0, n_generate, batch_size)]
        generated = sum(fixed_s + per_token_s * b * prompt + new_tokens * step_s for b in batches)
        return n_models * (scored + generated)

    estimate = seconds(num_generate, max_new_tokens)
    what = (f"{n_models} model{'s' if n_models > 1 else ''} x ({len(lengths)} conversations scored, {num_generate} "
            f"answers of up to {max_new_tokens} new tokens)")
    quick = (min(num_generate, QUICK_LOOK[0]), min(max_new_tokens, QUICK_LOOK[1]))
    if estimate > advise_above_s and quick != (num_generate, max_new_tokens):
        log.warning("evaluation will take about %s on this CPU: %s; --num-generate %d --max-new-tokens %d would take "
                    "about %s", _duration(estimate), what, *quick, _duration(seconds(*quick)))
    else:
        log.info("evaluation will take about %s on this CPU: %s", _duration(estimate), what)
    return estimate


def forward_cost(model, batch_size: int, long: int = 128, tries: int = 3) -> tuple[float, float]:
    """(fixed seconds, seconds per token) of one forward pass, from a batch_size x 1 and a 1 x `long` input.

    Each is the best of `tries` timings: one timing taken while another process holds the CPU can be ten times
    the steady cost (0.7 to 15 ms on the tiny model on a busy 2-core machine), and the estimate multiplies the
    fixed cost by every decoding step, so a single timing predicted minutes for a 12-second evaluation."""
    import torch

    def timed(shape: tuple[int, int]) -> float:
        ids = torch.full(shape, 1, dtype=torch.long, device=model.device)
        best = float("inf")
        for _ in range(tries):
            start = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            best = min(best, time.perf_counter() - start)
        return best

    timed((1, 8))  # warm-up: first-call set-up (and bitsandbytes' weight packing) is not the steady cost
    short, longer = timed((batch_size, 1)), timed((1, long))
    per_token = max(longer - short, 0.0) / max(long - batch_size, 1)
    return max(short - per_token * batch_size, 0.0), per_token


def decoding_step_cost(model, batch_size: int, steps: int = 4, tries: int = 3) -> float:
    """Seconds per decoding step of a `batch_size` batch: model.generate of `steps` new tokens after an 8-token
    prompt, the best of `tries`, divided by `steps`."""
    import torch

    ids = torch.full((batch_size, 8), 1, dtype=torch.long, device=model.device)
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                           min_new_tokens=steps, do_sample=False, pad_token_id=0)
        best = min(best, time.perf_counter() - start)
    return best / steps


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def evaluation_data(run_dir: Path | None, data: str | None) -> tuple[DataConfig, Path | None]:
    """(data settings, run directory or None): the run's data section, with --data FILE replacing its source."""
    from phitune.config.schema import load_run_config

    source = Path(run_dir) if run_dir is not None and (Path(run_dir) / "phitune_config.yaml").is_file() else None
    if source is None and data is None:
        raise PhituneError("without a run directory, pass --data FILE to evaluate on")
    data_cfg = load_run_config(source).data if source is not None else DataConfig(train=data)
    return (replace(data_cfg, train=data) if data is not None else data_cfg), source


def eval_conversations(data_cfg: DataConfig, use_eval_split: bool) -> list:
    """The held-out conversations of a run (its eval file or the same eval_split; a streamed run's first rows, as
    training held them out), or every row of --data."""
    from phitune.data import load_conversations

    if not use_eval_split:  # --data FILE: the whole file is the eval set
        data_cfg = data_cfg.whole_file_as_eval()
        return load_conversations(data_cfg).train
    if data_cfg.streaming:  # the examples training held out, without reading the whole stream
        from phitune.data.stream import held_out_conversations

        conversations = held_out_conversations(data_cfg)
    else:
        conversations = load_conversations(data_cfg).eval
    if not conversations:
        raise PhituneError("the run has no eval set (data.eval_split is 0 and no data.eval); pass --data FILE")
    return conversations


def tokenize_eval_set(conversations: list, tokenizer, data_cfg: DataConfig) -> tuple[list, list]:
    """(input_ids, labels) rendered and masked exactly as in training."""
    from phitune.data import tokenize_conversations

    tokenized = tokenize_conversations(conversations, tokenizer, max_seq_length=data_cfg.max_seq_length,
                                       train_on=data_cfg.train_on, on_bad_row="skip", name="eval")
    return tokenized.input_ids, tokenized.labels


def split_prompts(conversations: list, tokenizer) -> tuple[list, list[str]]:
    """Each conversation up to its last assistant turn (the prompt), and that turn's text (the reference).

    Tool calls are written into the assistant's content first, as training renders them (Phi-4-mini's hub template
    drops a `tool_calls` field: earlier calls would vanish from the prompt and a reference that is a call would be
    empty); a call's reference is then decoded as the answers are, without special tokens."""
    from phitune.data.templates import template_family
    from phitune.data.tools import render_for_template

    rendered = render_for_template(conversations, template_family(tokenizer.chat_template or ""))
    prompts, references = [], []
    for original, messages in zip(conversations, rendered):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(messages[:last])
        reference = messages[last]["content"]
        if "tool_calls" in original[last]:
            ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
            reference = tokenizer.decode(ids, skip_special_tokens=True).strip()
        references.append(reference)
    return prompts, references


def teacher_forced_metrics(model, tokenizer, tokenized: tuple[list, list], batch_size: int = 8) -> dict:
    """Token-weighted loss, perplexity and token accuracy over the labelled tokens: phitune.after.metrics, the definition
    the evaluations during training use too."""
    import torch

    from phitune.after.metrics import sequence_token_stats, summarize

    totals = torch.zeros(3, dtype=torch.float64)
    input_ids, labels = tokenized
    for start in range(0, len(input_ids), batch_size):
        ids, mask, labs = _right_pad(input_ids[start : start + batch_size], labels[start : start + batch_size],
                                     tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        totals += sequence_token_stats(logits, labs.to(logits.device)).sum(0).cpu()
    metrics = summarize(totals)
    if not metrics:
        raise PhituneError("the eval set has no trained tokens to score")
    metrics.pop("tokens")
    return metrics


def distillation_metrics(model, teacher, tokenized: tuple[list, list], pad_id: int, batch_size: int = 8) -> dict:
    """kl_to_teacher (mean KL(p_teacher || p_model) per trained token), loss and perplexity of `model` over the
    labelled tokens of `tokenized` (phitune.after.metrics): what a distilled student is judged by, the teacher's
    distributions and the data's own tokens."""
    import torch

    from phitune.after.metrics import perplexity, teacher_kl_sums

    totals = torch.zeros(3, dtype=torch.float64)
    input_ids, labels = tokenized
    was_training = model.training
    model.eval()
    for start in range(0, len(input_ids), batch_size):
        ids, mask, labs = _right_pad(input_ids[start : start + batch_size], labels[start : start + batch_size], pad_id)
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            reference = teacher(input_ids=ids.to(teacher.device), attention_mask=mask.to(teacher.device)).logits
        totals += teacher_kl_sums(logits, reference, labs.to(logits.device))
    model.train(was_training)
    kl_sum, nll_sum, tokens = totals.tolist()
    if tokens == 0:
        raise PhituneError("the eval set has no trained tokens to score")
    return {"kl_to_teacher": kl_sum / tokens, "loss": nll_sum / tokens, "perplexity": perplexity(nll_sum / tokens)}


def _right_pad(ids: list[list[int]], labels: list[list[int]], pad_id: int):
    import torch

    width = max(len(row) for row in ids)
    out_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    out_mask = torch.zeros((len(ids), width), dtype=torch.long)
    out_labels = torch.full((len(ids), width), -100, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(ids, labels)):
        out_ids[i, : len(row)] = torch.tensor(row)
        out_mask[i, : len(row)] = 1
        out_labels[i, : len(lab)] = torch.tensor(lab)
    return out_ids, out_mask, out_labels


def _generate(model, tokenizer, prompts: list, settings: SamplingSettings, batch_size: int) -> list[str]:
    from phitune.after.generate import generate_replies

    return generate_replies(model, tokenizer, prompts, settings, batch_size=batch_size) if prompts else []


def generation_metrics(answers: list[str], references: list[str]) -> dict:
    """Mean ROUGE-L F1 and exact-match rate of `answers` against `references`."""
    from rouge_score import rouge_scorer

    if not answers:
        return {}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references)]
    exact = [normalise(ans) == normalise(ref) for ans, ref in zip(answers, references)]
    return {"rougeL_f1": sum(rouge) / len(rouge), "exact_match": sum(exact) / len(exact)}


def normalise(text: str) -> str:
    """Lower case, single spaces: "The  cat." and "the cat." match; punctuation still counts."""
    return " ".join(text.lower().split())
