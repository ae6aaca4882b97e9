"""An Ollama Modelfile for an exported GGUF: Phi-3's chat format and its stop tokens.

Ollama does not run the Jinja chat template stored in the GGUF; it needs its own Go template. The one below renders
each message as `<|role|>\\n{content}<|end|>\\n` and opens `<|assistant|>\\n` after the last one, which is what Phi-3's
template (and phitune's training format) produce. `<|end|>` is the stop that ends a turn; the others stop a model
that starts writing the next turn itself.
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


def modelfile_text(gguf_name: str, system: str | None = None) -> str:
    """The Modelfile for `gguf_name`, a file in the same directory (Ollama resolves FROM ./ against the Modelfile)."""
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{TEMPLATE}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in STOPS]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, system: str | None = None) -> Path:
    """Write `Modelfile` next to the GGUF file; return its path."""
    path = gguf_path.parent / "Modelfile"
    path.write_text(modelfile_text(gguf_path.name, system), encoding="utf-8")
    return path
