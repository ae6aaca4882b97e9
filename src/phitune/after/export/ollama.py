"""An Ollama Modelfile for an exported GGUF: the model family's chat format and its stop tokens.

Ollama does not run the Jinja chat template stored in the GGUF; it needs its own Go template. Phi-3's renders each
message as `<|role|>\\n{content}<|end|>\\n` and opens `<|assistant|>\\n` after the last one, which is what Phi-3's
template (and phitune's training format) produce. `<|end|>` is the stop that ends a turn; the others stop a model
that starts writing the next turn itself. Phi-4-mini (`<|role|>{content}<|end|>`, no newlines) and Phi-4
(`<|im_start|>role<|im_sep|>{content}<|im_end|>`) get theirs, chosen from the chat template the GGUF carries
(phitune.data.templates.template_family). The reasoning models' templates write a system prompt of their own when
a conversation has none; the Go templates do not, so the Modelfile carries it as its default `SYSTEM` (without it,
users report traces that never close).
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ if and $last (ne .Role "assistant") }}<|assistant|>
{{ end }}
{{- end }}"""
STOPS = ("<|end|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>")
PHI4_MINI_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|{{ .Role }}|>{{ .Content }}<|end|>
{{- if and $last (ne .Role "assistant") }}<|assistant|>{{ end }}
{{- end }}"""
PHI4_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant<|im_sep|>{{ end }}
{{- end }}"""
FAMILIES = {  # template_family -> (Go template, stops)
    None: (TEMPLATE, STOPS),
    "phi-3": (TEMPLATE, STOPS),
    "phi-4-mini": (PHI4_MINI_TEMPLATE, STOPS),
    "phi-4": (PHI4_TEMPLATE, ("<|im_end|>", "<|im_start|>", "<|endoftext|>")),
}


def modelfile_text(gguf_name: str, system: str | None = None, family: str | None = None) -> str:
    """The Modelfile for `gguf_name`, a file in the same directory (Ollama resolves FROM ./ against the Modelfile);
    `family` as phitune.data.templates.template_family names it (None, an unrecognised template: Phi-3's)."""
    template, stops = FAMILIES[family]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, system: str | None = None) -> Path:
    """Write `Modelfile` next to the GGUF file; return its path. `system` (else the system prompt the GGUF's chat
    template writes by default, a reasoning model's) is the Modelfile's SYSTEM."""
    import gguf

    from phitune.data.templates import SYSTEM_PROMPTS, template_family

    field = gguf.GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    template = field.contents() if field is not None else ""
    family = template_family(template) if field is not None else None
    system = system or next((prompt for prompt in SYSTEM_PROMPTS if prompt in template), None)
    path = gguf_path.parent / "Modelfile"
    path.write_text(modelfile_text(gguf_path.name, system, family), encoding="utf-8")
    return path
