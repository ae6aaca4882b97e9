"""Phi-4-multimodal's built-in LoRA adapters of the language model, applied row by row as the original model does.

A converted checkpoint holds two PEFT adapters of the language model in folders of their own: `vision-lora` (what
the model was trained with on pictures) and `speech-lora` (on sound). The original model switches between them by
what a prompt holds: pictures (with or without audio) take `vision-lora`, audio alone takes `speech-lora`, text alone
takes neither (microsoft/Phi-4-multimodal-instruct's modeling code: `set_lora_adapter('vision' | 'speech')`,
`unset_lora_adapter()` for text). phitune does the same for every row of a batch, so a mixed dataset trains each row
with the adapter it is served with, and a user's LoRA is trained on top of the right one.

How: each adapted linear layer keeps the built-in A and B matrices as buffers that are not saved
(`persistent=False`: never in a checkpoint, an adapter or a merged model) and adds, for the rows of its mode,
`h = W0 x + s_mode B_mode A_mode x` with `s = lora_alpha / r` as PEFT computes it. A hook on the language model reads
each row's mode from its ids: a row with the image token is vision, else one with the audio token is speech, else
none; a one-token step of generation keeps its prompt's modes. A user's PEFT LoRA wraps the same layers and adds its
own term, so the sum is exactly PEFT with both adapters active; `phitune merge` folds the user's LoRA into W0 and
copies both folders beside it, which is the original layout again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from phitune.config.schema import ModelConfig
from phitune.errors import PhituneError

log = logging.getLogger("phitune")

BUILT_IN_FOLDERS = {"vision": "vision-lora", "speech": "speech-lora"}  # mode -> folder in the checkpoint
NO_ADAPTER, VISION, SPEECH = 0, 1, 2  # a row's mode, as stored per row


class RowModes:
    """The mode of each row of the batch in flight (None: no batch yet), shared by every adapted layer's hook."""

    def __init__(self, image_token_id: int, audio_token_id: int):
        self.image_token_id, self.audio_token_id = image_token_id, audio_token_id
        self.rows, self.present = None, frozenset()

    def read(self, input_ids) -> None:
        """Each row's mode from its ids: image token -> vision, else audio token -> speech, else none."""
        has_image = (input_ids == self.image_token_id).any(-1)
        has_audio = (input_ids == self.audio_token_id).any(-1)
        self.rows = has_image * VISION + (~has_image & has_audio) * SPEECH
        self.present = frozenset(self.rows.unique().tolist())  # one sync a forward, not one a layer


def find_built_in_loras(cfg: ModelConfig, warn: bool = True) -> dict[str, Path]:
    """{mode: folder} of the built-in adapters the checkpoint has (a local folder or the hub cache); a warning for
    each it lacks (unless `warn` is False): its rows then go through the language model without it."""
    from transformers.utils import cached_file

    found = {}
    for mode, folder in BUILT_IN_FOLDERS.items():
        try:
            path = cached_file(cfg.name_or_path, f"{folder}/adapter_config.json", revision=cfg.revision,
                               _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except Exception:  # noqa: BLE001 - a hub problem: no built-in adapter found, said below
            path = None
        if path is None and warn:
            log.warning("%s has no %s folder: rows with %s go through the language model without Phi-4-multimodal's "
                        "built-in %s adapter", cfg.name_or_path, folder,
                        "pictures" if mode == "vision" else "audio only", mode)
        elif path is not None:
            found[mode] = Path(path).parent
    return found


def attach_built_in_loras(model, cfg: ModelConfig) -> list[str]:
    """Give `model` (a Phi4MultimodalForCausalLM) its checkpoint's built-in adapters, each used for its rows only;
    the modes attached, in order."""
    folders = find_built_in_loras(cfg)
    if not folders:
        return []
    weights = read_adapters(model, folders, model.dtype)
    modes = RowModes(model.config.vision_config.image_token_id, model.config.audio_config.audio_token_id)
    for name, per_mode in weights.items():
        add_built_in_terms(model.get_submodule(name), per_mode, modes)
    model.model.register_forward_pre_hook(_read_row_modes(modes), with_kwargs=True)
    log.info("built-in adapters of %s: %s, each for its own rows", cfg.name_or_path,
             ", ".join(BUILT_IN_FOLDERS[m] for m in folders))
    return list(folders)


def read_adapters(model, folders: dict[str, Path], dtype) -> dict[str, dict]:
    """{module name: {mode: (A, B, scaling)}} in `dtype` (the model's: PEFT would hold them in fp32, twice the
    memory: Phi-4-multimodal's two adapters are 0.83B parameters, 1.7 GB in bf16), read by PEFT itself (its key
    layout, rank and alpha patterns), then the PEFT layers taken out again: the model is left as it was."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    (first, path), *rest = folders.items()
    peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=first)
    for mode, path in rest:
        peft_model.load_adapter(str(path), adapter_name=mode)
    weights: dict[str, dict] = {}
    for name, layer in peft_model.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for mode in folders:
            if mode in layer.lora_A:
                if layer.use_dora.get(mode):
                    raise PhituneError(f"the built-in {BUILT_IN_FOLDERS[mode]} uses DoRA, which phitune does not "
                                       "apply per row")
                a, b = layer.lora_A[mode].weight.detach(), layer.lora_B[mode].weight.detach()
                weights.setdefault(name, {})[mode] = (a.to(dtype, copy=True), b.to(dtype, copy=True),
                                                      float(layer.scaling[mode]))
    peft_model.unload()
    return weights


def add_built_in_terms(layer, per_mode: dict, modes: RowModes) -> None:
    """Keep a layer's built-in A and B as unsaved buffers and add `s B A x` to the rows of their mode."""
    import torch

    codes = {"vision": VISION, "speech": SPEECH}
    terms = []
    for mode, (a, b, scaling) in per_mode.items():
        layer.register_buffer(f"built_in_{mode}_A", a, persistent=False)  # (r, in_features)
        layer.register_buffer(f"built_in_{mode}_B", b, persistent=False)  # (out_features, r)
        terms.append((codes[mode], f"built_in_{mode}_A", f"built_in_{mode}_B", scaling))

    def add_terms(module, args, output):
        if modes.rows is None:
            return output
        x = args[0]
        for code, a_name, b_name, scaling in terms:
            if code not in modes.present:
                continue
            a, b = getattr(module, a_name), getattr(module, b_name)
            term = torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b) * scaling
            rows = (modes.rows == code).to(term.dtype).view(-1, *[1] * (term.dim() - 1))  # (batch, 1, ..., 1)
            output = output + (term * rows).to(output.dtype)
        return output

    layer.register_forward_hook(add_terms)


def _read_row_modes(modes: RowModes):
    """The language model's pre-hook: each forward's rows read from its ids; a generation step of one new token
    per row keeps the modes its prompt set."""

    def read(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise PhituneError("Phi-4-multimodal's built-in adapters choose a row's adapter from its input_ids; "
                               "pass input_ids, not inputs_embeds")
        decoding = ids.shape[-1] == 1 and modes.rows is not None and len(modes.rows) == len(ids)
        if not decoding:
            modes.read(ids)

    return read
