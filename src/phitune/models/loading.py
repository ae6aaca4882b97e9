"""Base model and tokenizer: loading (bf16 / 4-bit), Phi-3 specifics, and target-module resolution.

Phi-3 facts that matter here: q/k/v are fused into `qkv_proj` and gate/up into `gate_up_proj`; the pad token must be
`<unk>`, not the eos token, or the model never learns to stop (padding positions are masked out of the loss, and so
would be every eos); chat turns close with `<|end|>`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from phitune.config.schema import ModelConfig
from phitune.errors import PhituneError, first_line

log = logging.getLogger("phitune")

FUSED_PROJECTIONS = {  # logical name -> the fused Phi-3 layer that holds it
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def check_model_path(name_or_path: str) -> None:
    """A name that looks like a local path must exist; anything else is taken as a hub id."""
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().exists():
        relative = "" if Path(name_or_path).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
        raise PhituneError(f"model path does not exist: {name_or_path}{relative}")


def not_found(name_or_path: str, exc: BaseException) -> PhituneError | None:
    """When a name is neither a local folder nor fetchable from the hub (offline, or no connection, and not in the
    hub cache), one line saying both: transformers' own error speaks of the hub connection alone."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    chain = [exc]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if Path(name_or_path).expanduser().exists() or not any(isinstance(e, LocalEntryNotFoundError) for e in chain):
        return None
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no connection, and it is not in the hub cache"
    return PhituneError(f"model {name_or_path} is not a local folder (no {Path.cwd() / Path(name_or_path).expanduser()}"
                        f") and the hub could not be reached to fetch it as a hub id ({why}): correct the path (a folder "
                        "you downloaded or converted, as the config's comments may say), or, for a hub id, connect and "
                        "run again")


def load_tokenizer(cfg: ModelConfig, padding_side: str = "right"):
    """Load the tokenizer with Phi-3's conventions: pad = unk (not eos), a chat template, the given padding side."""
    from transformers import AutoTokenizer

    check_model_path(cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    except (OSError, ValueError) as exc:
        raise not_found(cfg.name_or_path, exc) or PhituneError(
            f"cannot load the tokenizer of {cfg.name_or_path}: {first_line(exc)}") from None
    if tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.pad_token is None:
        raise PhituneError(f"{cfg.name_or_path}: the tokenizer has neither an unk nor a pad token to pad with")
    elif tokenizer.pad_token == tokenizer.eos_token and not turn_end_token(tokenizer):
        # Phi-4-mini pads with its eos too, but ends each turn with <|end|>, which training keeps (phitune data says
        # so): only a tokenizer without its own end-of-turn token risks a model that never learns to stop
        log.warning("the tokenizer pads with its eos token %s and has no unk token: check the end of turn is "
                    "trained (phitune data CONFIG shows it)", tokenizer.eos_token)
    if not tokenizer.chat_template:
        from trl.chat_template_utils import phi3_chat_template

        tokenizer.chat_template = phi3_chat_template
    tokenizer.padding_side = padding_side
    warn_if_not_sentencepiece(tokenizer, cfg)
    return tokenizer


TURN_ENDS = ("<|end|>", "<|im_end|>")  # Phi-3/4's end of a turn, and Phi-4's ChatML one


def turn_end_token(tokenizer) -> str | None:
    """The token that ends a chat turn, when the tokenizer has one other than its eos (None otherwise)."""
    vocab = tokenizer.get_vocab()
    return next((token for token in TURN_ENDS if token in vocab and token != tokenizer.eos_token), None)


SENTENCEPIECE_PROBES = (" Hello world", "Hello\n  world", "ಕರ್ನಾಟಕ 🎉")
_checked: set[tuple[str, str]] = set()  # (tokenizer class, SentencePiece model's digest) compared in this process


def warn_if_not_sentencepiece(tokenizer, cfg: ModelConfig) -> None:
    """Warn, once per process and model, when transformers tokenizes plain text otherwise than the model's own
    SentencePiece model (`tokenizer.model`), which is also how llama.cpp and Ollama tokenize it. A model is known by
    the file's content, not its path: an export loads the base's tokenizer and then the merged copy's, one warning.

    transformers 5 builds a Phi-3 tokenizer from its files alone as a Metaspace `LlamaTokenizer` (docs/export.md,
    "Train/serve parity"): the model would be fine-tuned on ids a GGUF runtime never feeds it. Without the file
    (a model that has none, a hub model offline) or without the `sentencepiece` package there is nothing to compare
    with, and nothing is said: this check never stops a command."""
    model_file = _sentencepiece_file(cfg)
    if model_file is None:
        return
    try:
        key = (type(tokenizer).__name__, hashlib.sha256(Path(model_file).read_bytes()).hexdigest())
    except OSError:  # a file it cannot read: nothing to compare with
        return
    if key in _checked:
        return
    _checked.add(key)
    try:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=model_file)
    except Exception:  # noqa: BLE001 - an optional dependency (phitune[export]), or a file it cannot read
        return
    for text in SENTENCEPIECE_PROBES:
        ours, theirs = tokenizer(text, add_special_tokens=False).input_ids, sp.encode(text)
        if ours != theirs:
            log.warning("this tokenizer (%s) tokenizes %r as %s, its SentencePiece model as %s: llama.cpp and "
                        "Ollama would feed the fine-tuned model other ids than it is trained on; load it from the "
                        "model's folder (with config.json), see docs/export.md", type(tokenizer).__name__, text,
                        ours, theirs)
            return


def _sentencepiece_file(cfg: ModelConfig) -> str | None:
    """The model's `tokenizer.model`: in its folder, or for a hub id in the hub cache, else downloaded like the
    tokenizer's other files (offline, or on any error: None)."""
    local = Path(cfg.name_or_path).expanduser() / "tokenizer.model"
    if local.is_file():
        return str(local)
    if Path(cfg.name_or_path).expanduser().is_dir():
        return None
    try:
        from transformers.utils import cached_file

        return cached_file(cfg.name_or_path, "tokenizer.model", revision=cfg.revision,
                           _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except Exception:  # noqa: BLE001 - a hub problem must not stop a command over a warning
        return None


def resolve_dtype(name: str, log_choice: bool = False):
    """`auto` means bfloat16 where the hardware computes it natively (a bf16 GPU, or a CPU with AVX512-BF16 or AMX),
    float32 elsewhere: without native bf16 a CPU emulates bf16 matmuls, slower than float32. bf16 halves the memory
    (Phi-3-mini: 7.6 GB instead of 15.3 GB) and, on such a CPU, more than doubles the speed."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    dtype, reason = auto_dtype()
    if log_choice:
        log.info("torch_dtype auto: %s, %s", str(dtype).replace("torch.", ""), reason)
    return dtype


def auto_dtype():
    """(dtype, why) for `torch_dtype: auto` on this machine."""
    import torch

    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "the GPU supports bf16"
        return torch.float32, "the GPU has no bf16"
    flags = cpu_bf16_flags()
    if flags:
        return torch.bfloat16, f"the CPU computes bf16 natively ({', '.join(flags)})"
    return torch.float32, "the CPU has no native bf16 (no avx512_bf16 / amx_bf16), so bf16 would be emulated and slower"


def cpu_bf16_flags() -> list[str]:
    """The CPU's native-bf16 feature flags from /proc/cpuinfo (the flags bitsandbytes also keys on); [] elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    words = set(text.split())
    return [flag for flag in ("avx512_bf16", "amx_bf16") if flag in words]


def resolve_attn_implementation(name: str, padding_free: bool = False) -> str:
    """`auto` picks flash_attention_2 on CUDA when flash-attn is installed, flex_attention on CUDA for padding-free
    batches without it, else sdpa (see phitune.speed.auto_attention)."""
    from phitune.speed import auto_attention

    return auto_attention(padding_free) if name == "auto" else name


def quantization_config(cfg: ModelConfig, sharded: bool = False):
    """bitsandbytes 4-bit settings for QLoRA, or None. `sharded` (FSDP): the packed 4-bit weights are stored in the
    compute dtype (bnb_4bit_quant_storage), because FSDP shards and gathers floating-point tensors of one dtype."""
    if not cfg.quantization:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    settings = dict(cfg.quantization)
    dtype = settings.get("bnb_4bit_compute_dtype")
    if isinstance(dtype, str):
        settings["bnb_4bit_compute_dtype"] = resolve_dtype(dtype) if dtype == "auto" else getattr(torch, dtype)
    if sharded:
        settings.setdefault("bnb_4bit_quant_storage", settings.get("bnb_4bit_compute_dtype") or torch.bfloat16)
    try:
        return BitsAndBytesConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise PhituneError(f"model.quantization: {first_line(exc)}") from None


def load_base_model(cfg: ModelConfig, training: bool = True, device_map=None, padding_free: bool = False,
                    sharded: bool = False, dtype=None, attn_implementation: str | None = None, head: str = "lm"):
    """Load the causal LM in the configured dtype and attention implementation; no KV cache while training.

    `padding_free` says the batches will be concatenated rows, which changes what attention `auto` picks. A training
    run passes `dtype` and `attn_implementation` as its RunPlan resolved them (phitune.run.plan), so they are decided
    once; other callers leave them None and they are resolved from `cfg` here. `head="score"` loads the same
    checkpoint as a reward model instead (see load_score_model's note on the head)."""
    import torch
    from transformers import AutoModelForCausalLM

    from phitune.speed.threads import use_free_cores

    check_model_path(cfg.name_or_path)
    use_free_cores()
    quant = quantization_config(cfg, sharded=sharded)
    if quant is not None and device_map is None and not sharded:  # FSDP places the shards itself
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    auto_class, head_kwargs = (AutoModelForCausalLM, {}) if head == "lm" else _score_head_class()
    try:
        model = auto_class.from_pretrained(
            cfg.name_or_path,
            dtype=dtype if dtype is not None else resolve_dtype(cfg.torch_dtype, log_choice=True),
            attn_implementation=attn_implementation or resolve_attn_implementation(cfg.attn_implementation,
                                                                                   padding_free),
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
            quantization_config=quant,
            device_map=device_map,
            use_safetensors=True,
            **head_kwargs,
        )
    except ImportError as exc:
        raise PhituneError(f"cannot load {cfg.name_or_path}: {first_line(exc)}") from None
    except (OSError, ValueError) as exc:
        raise not_found(cfg.name_or_path, exc) or PhituneError(
            f"cannot load model {cfg.name_or_path}: {first_line(exc)}") from None
    if quant is not None and not torch.cuda.is_available():
        if training:
            keep_4bit_trainable(model)
        else:
            _use_generic_cpu_4bit(model)
    if getattr(model.config, "model_type", "") == "phi4_multimodal":
        from phitune.models.built_in_lora import attach_built_in_loras

        attach_built_in_loras(model, cfg)  # vision-lora for rows with pictures, speech-lora for audio-only rows
    if training:
        refuse_dropped_gradients()
        name_experts_for_trl(model.config.get_text_config())
    model.config.use_cache = not training
    return model


def _score_head_class():
    """(AutoModelForSequenceClassification, its one-output kwargs), for load_base_model's head="score"."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification, {"num_labels": 1}


def load_score_model(cfg: ModelConfig, tokenizer, training: bool = False, seed: int | None = None, dtype=None,
                     attn_implementation: str | None = None, sharded: bool = False):
    """The base with a reward head instead of its language-model head: `score`, one linear layer hidden -> 1, read at
    each sequence's last token that is not padding (transformers' *ForSequenceClassification, Phi3's included).

    The head is not in a causal LM's checkpoint, so it starts random: `seed` (the run's training_config.seed) makes it
    the same head in training and in `phitune eval`'s "untrained head" column. The model finds the last token by
    `config.pad_token_id`, which must be the id the tokenizer pads with (phitune pads Phi-3 with `<unk>`, while Phi-3's
    config names `<|endoftext|>`): otherwise a padded row is scored at a padding position."""
    from transformers import set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    if seed is not None:
        set_seed(seed)
    with suppress_seqcls_warning():  # "score.weight missing", "lm_head.weight unexpected": both by design here
        model = load_base_model(cfg, training=training, dtype=dtype, attn_implementation=attn_implementation,
                                sharded=sharded, head="score")
    if not hasattr(model, "score"):
        raise PhituneError(f"{cfg.name_or_path} ({model.config.model_type}) has no `score` head in transformers' "
                           "sequence classification class; method reward needs one (every Phi text model has it)")
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def name_experts_for_trl(config) -> None:
    """TRL 1.16 adds an MoE's load-balancing loss (PhiMoE: router_aux_loss_coef 0.001) reading `num_experts`, which
    PhiMoE's config calls `num_local_experts`; without the alias the first training step dies with AttributeError."""
    experts = getattr(config, "num_local_experts", None)
    if experts is not None and "num_experts" not in config.to_dict():
        config.num_experts = experts


def keep_4bit_trainable(model) -> None:
    """Keep every 4-bit layer off bitsandbytes' packed CPU format while the model trains.

    On a CPU with AVX512-BF16, bitsandbytes repacks a layer's 4-bit weight into an inference-only layout the first
    time the layer runs without gradients (an evaluation), and from then on multiplies through `gemv_4bit`, which has
    no backward: the gradient through every frozen 4-bit matmul is dropped and the LoRA layers below it learn from a
    wrong signal, with only a warning to show for it. A training model never takes that path.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _use_generic_cpu_4bit(model) -> None:
    """bitsandbytes' packed CPU 4-bit path needs in_features % 64 == 0 and out_features % 32 == 0; other layers take
    the generic path instead of failing (real Phi-3 sizes qualify; the tiny test models do not)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and (module.in_features % 64 or module.out_features % 32):
            module.support_avx512bf16_for_cpu = False


DROPPED_GRADIENT_WARNING = r".*an autograd kernel was not registered"  # torch: backprop through an op without one


def refuse_dropped_gradients() -> None:
    """Make torch's "an autograd kernel was not registered ... silently incorrect behavior" warning an error.

    torch says it when backward passes through an operator (such as bitsandbytes' gemv_4bit) that has no gradient:
    the gradient is dropped and training goes on, wrong. A run that says so must stop instead."""
    import warnings

    warnings.filterwarnings("error", message=DROPPED_GRADIENT_WARNING, category=UserWarning)


def check_target_modules(cfg: ModelConfig, target_modules, model_config=None) -> None:
    """Resolve target_modules against the model built on the meta device, so a bad target fails before any weight
    is read (Phi-3-mini's 7.6 GB) rather than after. `model_config`: config.json when the caller has read it
    already (phitune.run.plan), so it is not read twice."""
    if target_modules in (None, "all-linear"):
        return
    import torch
    from transformers import AutoModelForCausalLM

    model_config = model_config if model_config is not None else load_model_config(cfg)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=cfg.trust_remote_code)
    resolve_target_modules(skeleton, target_modules)


def load_model_config(cfg: ModelConfig):
    """The model's config.json (architecture, sizes, context length), without reading any weights."""
    from transformers import AutoConfig

    check_model_path(cfg.name_or_path)
    try:
        return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code,
                                          revision=cfg.revision)
    except (OSError, ValueError) as exc:
        if not cfg.trust_remote_code and _raw_model_type(cfg.name_or_path) == "phi3_v":
            raise PhituneError(f"{cfg.name_or_path} is Phi-3.5-vision, which exists only as remote code (phi3_v, never "
                               "merged into transformers); set model.trust_remote_code: true to run the model's own "
                               "code") from None
        raise not_found(cfg.name_or_path, exc) or PhituneError(
            f"cannot read the config of model {cfg.name_or_path}: {first_line(exc)}") from None


def _raw_model_type(name_or_path: str) -> str | None:
    """model_type in a local model folder's config.json, read as plain JSON (without transformers)."""
    import json

    try:
        config = json.loads((Path(name_or_path).expanduser() / "config.json").read_text(encoding="utf-8"))
        return config.get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def linear_layer_names(model) -> list[str]:
    """Distinct short names of the linear layers a LoRA may target (the output head and MoE routers excluded), in
    model order."""
    import torch

    routers = router_names(model)
    names: dict[str, None] = {}
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not full_name.endswith(("lm_head", "score")) \
                and full_name not in routers:
            names[full_name.rsplit(".", 1)[-1]] = None
    canonical = ["qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]  # readable order
    return sorted(names, key=lambda n: canonical.index(n) if n in canonical else len(canonical))


def router_names(model) -> set[str]:
    """Full names of MoE routers: linear layers beside an `experts` module (PhiMoE's `mlp.router`, `gate` in older
    checkpoints). A router's forward returns (logits, weights, experts), not a tensor, so a LoRA wrapper around it
    breaks the forward: it is adapted only when named, and then through its weight (PEFT target_parameters)."""
    import torch

    routers = set()
    for parent_name, parent in model.named_modules():
        if isinstance(getattr(parent, "experts", None), torch.nn.Module):
            for child_name, child in parent.named_children():
                if isinstance(child, torch.nn.Linear):
                    routers.add(f"{parent_name}.{child_name}" if parent_name else child_name)
    return routers


def expert_parameter_names(model) -> list[str]:
    """`experts.NAME` of the 3-D expert weights (experts, out, in) of an MoE model (PhiMoE: gate_up_proj, down_proj).

    They are parameters, not linear layers, so PEFT adapts them through target_parameters, one LoRA per tensor."""
    names: dict[str, None] = {}
    for full_name, param in model.named_parameters():
        parent, _, leaf = full_name.rpartition(".")
        if parent.rsplit(".", 1)[-1] == "experts" and param.dim() == 3:
            names[f"experts.{leaf}"] = None
    return list(names)


def resolve_peft_targets(model, settings: dict) -> dict:
    """PEFT's target_modules and target_parameters for `settings` (peft_config).

    Dense Phi models keep `all-linear` as it is. On an MoE model `all-linear` becomes the attention projections by
    name (so the router is left alone) plus every expert weight; a named router or `experts` is adapted through its
    parameters."""
    targets = resolve_target_modules(model, settings.get("target_modules") or "all-linear")
    params = list(settings.get("target_parameters") or [])
    routers = {name.rsplit(".", 1)[-1] for name in router_names(model)}
    experts = expert_parameter_names(model)
    if targets == "all-linear" and (routers or experts):
        targets, params = linear_layer_names(model), params + experts
    elif isinstance(targets, list):
        params += [f"{t}.weight" for t in targets if t in routers] + (experts if "experts" in targets else [])
        targets = [t for t in targets if t not in routers and t != "experts"]
    return {"target_modules": targets, "target_parameters": list(dict.fromkeys(params)) or None}


def resolve_target_modules(model, target_modules, allow_fused_slices: bool = False):
    """Check that each target matches a module; an entry matching nothing is an error, never a silent skip.

    Public Phi-3 notebooks list q_proj/k_proj/v_proj/gate_proj/up_proj, which do not exist in Phi-3 (they are
    fused), so such a run silently adapts only o_proj and down_proj. We refuse instead, naming what exists.
    """
    if target_modules in (None, "all-linear"):
        return target_modules
    existing = linear_layer_names(model)
    all_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    # a dotted entry names a path's end, as PEFT matches it (`image_embed.img_projection_up` in Phi-4-multimodal)
    all_names |= {t for t in target_modules if "." in t and any(name == t or name.endswith("." + t)
                                                                   for name, _ in model.named_modules())}
    if isinstance(target_modules, str):  # PEFT treats a string as a regex over full module names
        if not any(re.fullmatch(target_modules, name) for name, _ in model.named_modules()):
            raise PhituneError(f"target_modules regex {target_modules!r} matches no module; "
                               f"{_existing(existing, model)}")
        return target_modules
    missing = [t for t in target_modules if t not in all_names and not (allow_fused_slices and _is_slice(t, existing))]
    if missing:
        raise PhituneError(
            f"target_modules: {', '.join(repr(m) for m in missing)} "
            f"match{'es' if len(missing) == 1 else ''} nothing; {_existing(existing, model)}"
            f"{_fused_hint(missing, existing)}"
        )
    return list(target_modules)


def _is_slice(target: str, existing: list[str]) -> bool:
    return FUSED_PROJECTIONS.get(target) in existing


def _existing(existing: list[str], model=None) -> str:
    text = f"this model's linear layers are {', '.join(existing)}"
    routers = sorted({name.rsplit(".", 1)[-1] for name in router_names(model)}) if model is not None else []
    if routers:
        experts = ", ".join(expert_parameter_names(model))
        names = ", ".join(f"`{name}`" for name in routers)
        text += (f"; the MoE router {names} (adapted only when named) and the expert weights {experts} (adapted by "
                 "all-linear, or when `experts` is named)")
    return text


def _fused_hint(missing: list[str], existing: list[str]) -> str:
    fused = sorted({FUSED_PROJECTIONS[m] for m in missing if _is_slice(m, existing)})
    if not fused:
        return ""
    return (
        f" (Phi-3 fuses them into {' and '.join(fused)}: target those, or use peft_config.backend: loralib "
        "to adapt single q/k/v or gate/up slices)"
    )


def untie_embeddings_for(model, target_modules) -> bool:
    """Give lm_head its own copy of the embedding matrix when LoRA targets one of two tied layers; True if it did.

    Phi-4-mini ties lm_head to embed_tokens: one matrix. Merging a LoRA on either would change both, so the merged
    model's inputs would move too and its logits would no longer be base + adapter (with PEFT 0.21 they differ by
    ~10 on a tiny model). Untying is deliberate and costs one more vocab x hidden matrix (Phi-4-mini: 200,064 x 3,072,
    1.2 GB in bf16), hence the warning. LoRA on other layers (all-linear) leaves the tie alone."""
    import torch

    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is not inputs.weight:
        return False
    tied = [name for name, module in model.named_modules() if module is inputs or module is outputs]
    targeted = [name for name in tied if _targets(name, target_modules)]
    if not targeted:
        return False
    outputs.weight = torch.nn.Parameter(inputs.weight.detach().clone(), requires_grad=inputs.weight.requires_grad)
    model.config.get_text_config().tie_word_embeddings = False
    model.config.tie_word_embeddings = False
    others = [name for name in tied if name not in targeted]
    log.warning("LoRA targets %s, which this model ties to %s: the output layer now has its own copy of the "
                "embeddings (+%d parameters), so that merging changes only what was trained", " and ".join(targeted),
                " and ".join(others) or "each other", inputs.weight.numel())
    return True


def _targets(full_name: str, target_modules) -> bool:
    """Whether PEFT's target_modules (a list of names, a regex string, or all-linear) selects `full_name`."""
    if target_modules in (None, "all-linear"):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, full_name) is not None
    return any(full_name == t or full_name.endswith("." + t) for t in target_modules)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count their real number of values."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if hasattr(param, "quant_state"):  # bitsandbytes Params4bit stores two 4-bit values per byte
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total

