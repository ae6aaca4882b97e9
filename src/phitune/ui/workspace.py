"""The folders `phitune ui` was started with, and the config work the page does in them.

Every path the page takes from a person (a config file, data files, an output directory, a local model) must lie
under one of these folders, or be one of phitune's own shipped files (the demo's tiny model and data, read only);
relative paths mean relative to the first folder, which is where training runs. Configs are checked by the same
code as `phitune train` (phitune.config.schema), and a hub token never reaches the page or a file: tokens in a YAML file
are dropped on reading (phitune reads them from HF_TOKEN), and any text shown is passed through `redact`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from phitune.config.schema import SECRET_KEYS, RunConfig, config_from_dict
from phitune.demo import DEMO_CONFIG, demo_overrides
from phitune.errors import PhituneError, first_line
from phitune.tiny.phi3 import ASSETS

DEMO = "demo: tiny Phi-3, bundled chat data (CPU, about a minute)"
CONFIG_FOLDER = "phitune-ui"  # under the first folder: the configs the page starts runs with, and their logs
_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")


def redact(text: str) -> str:
    """`text` with hub tokens (hf_..., and the values of HF_TOKEN / HUGGING_FACE_HUB_TOKEN) replaced by ***."""
    text = _TOKEN.sub("***", text)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return text


def shipped_examples() -> Path | None:
    """examples/ of a source checkout (a wheel ships only the demo)."""
    folder = Path(__file__).resolve().parents[3] / "examples"
    return folder if folder.is_dir() else None


class Workspace:
    """The folders the page may read and write, and the config checker working in them. `allow_remote_code`
    (`phitune ui --allow-remote-code`) lets the page start a config with `trust_remote_code: true`."""

    def __init__(self, folders: list[str | Path], allow_remote_code: bool = False):
        self.roots = [Path(folder).resolve() for folder in folders or [Path.cwd()]]
        self.allow_remote_code = allow_remote_code
        missing = [str(root) for root in self.roots if not root.is_dir()]
        if missing:
            raise PhituneError(f"not a folder: {', '.join(missing)}; start phitune ui with existing folders")

    @property
    def home(self) -> Path:
        return self.roots[0]

    def path(self, value: str | Path, shipped_ok: bool = False) -> Path:
        """`value` resolved (relative to the first folder); refused unless under one of the folders (or, with
        `shipped_ok`, among phitune's shipped files)."""
        path = (self.home / Path(value).expanduser()).resolve()
        allowed = [*self.roots, *([ASSETS.resolve()] if shipped_ok else [])]
        if not any(path == root or root in path.parents for root in allowed):
            folders = ", ".join(str(root) for root in self.roots)
            raise PhituneError(f"{value} is outside the folders this page was started with ({folders}); "
                               "start phitune ui with its folder too")
        return path

    def example_names(self) -> list[str]:
        examples = shipped_examples()
        return [DEMO, *(sorted(p.name for p in examples.glob("*.yaml")) if examples else [])]

    def example_yaml(self, name: str) -> str:
        """A shipped config's text; the demo's with this installation's model and data paths, and its output
        directory under the first folder."""
        if name == DEMO:
            raw = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
            from phitune.config.schema import apply_overrides

            apply_overrides(raw, demo_overrides(self.home / "outputs" / "demo"))
            return yaml.safe_dump(raw, sort_keys=False)
        examples = shipped_examples()
        if examples is None or name not in self.example_names():
            raise PhituneError(f"no shipped example named {name!r}")
        return (examples / name).read_text(encoding="utf-8")

    def read_yaml_file(self, value: str) -> str:
        """A YAML file under the folders, with any hub token left out."""
        path = self.path(value)
        if not path.is_file():
            raise PhituneError(f"config file not found: {value}")
        text = path.read_text(encoding="utf-8")
        raw = parse_yaml(text)
        if _has_secret(raw):
            return yaml.safe_dump(_drop_secrets(raw), sort_keys=False)
        return text

    def check(self, text: str) -> tuple[RunConfig | None, list[str]]:
        """The config checker's problems with `text` (every one, with its did-you-mean), as a list; and the
        RunConfig when there are none. Paths outside the folders, and code the page may not run, are problems too."""
        try:
            cfg = config_from_dict(parse_yaml(text))
        except PhituneError as exc:
            return None, split_problems(str(exc))
        problems = self._code_problems(cfg)
        for value, shipped_ok in self._paths_of(cfg):
            try:
                self.path(value, shipped_ok=shipped_ok)
            except PhituneError as exc:
                problems.append(str(exc))
        return (None if problems else cfg), problems

    def _code_problems(self, cfg: RunConfig) -> list[str]:
        """What the page may not start although `phitune train` in a terminal would: a model's own code
        (`trust_remote_code: true`) unless the page was started with --allow-remote-code, and a reward function
        given as a module name (an installed module's code; a reward file under the folders is the page's way)."""
        problems = []
        if cfg.model.trust_remote_code and not self.allow_remote_code:
            problems.append("model.trust_remote_code: true runs the model repository's code on this machine; the "
                            "page starts it only when phitune ui was started with --allow-remote-code")
        for index, entry in enumerate(cfg.rewards or []):
            target = str(entry.get("function", "")).rpartition(":")[0]
            if target and not target.endswith(".py"):
                problems.append(f"rewards[{index}].function {target} is a module the page does not run; give a "
                                "file under the folders (path/to/file.py:name) or use phitune train in a terminal")
        return problems

    def _paths_of(self, cfg: RunConfig) -> list[tuple[str, bool]]:
        """(path, may be a shipped file) for every local path of `cfg`: data, output directory, a local model, a
        reward file (which runs as code: never a shipped file)."""
        data = ([s.path for s in (*cfg.data.train_sources(), *cfg.data.eval_sources())] if cfg.data.is_mixture
                else [cfg.data.train, cfg.data.eval])  # every source of a mixture
        paths = [*((path, True) for path in data), (str(cfg.output_dir), False)]
        paths += [(entry["function"].rpartition(":")[0], False) for entry in cfg.rewards or []
                  if str(entry.get("function", "")).rpartition(":")[0].endswith(".py")]
        for model_path in (cfg.model.name_or_path, cfg.model.adapter):
            if model_path and (model_path.startswith((".", "/", "~")) or (self.home / model_path).exists()):
                paths.append((model_path, True))
        return [(value, ok) for value, ok in paths if value and not _hub_dataset(value)]

    def save_run_config(self, text: str, cfg: RunConfig) -> Path:
        """Write the config a run starts with to phitune-ui/RUN_NAME.yaml under the first folder (it is what
        --resume starts the run again with); tokens left out."""
        folder = self.path(CONFIG_FOLDER)
        folder.mkdir(exist_ok=True)
        path = folder / f"{self.path(cfg.output_dir).name}.yaml"
        path.write_text(yaml.safe_dump(_drop_secrets(parse_yaml(text)), sort_keys=False), encoding="utf-8")
        return path

    def config_of_run(self, output_dir: Path) -> Path:
        """The config to resume `output_dir` with: the one the page started it with, else the run's own."""
        for path in (self.path(CONFIG_FOLDER) / f"{output_dir.name}.yaml", output_dir / "phitune_config.yaml"):
            if path.is_file():
                return path
        raise PhituneError(f"no config to resume {output_dir} with; start it from the Configure tab with --resume")


# The form beside the YAML editor: the settings people change most, each a `--set` key (section.key)
FORM_FIELDS = ["data.train", "data.eval", "data.max_seq_length", "training_config.output_dir",
               "training_config.learning_rate", "training_config.num_train_epochs", "training_config.max_steps",
               "training_config.per_device_train_batch_size", "peft_config.r", "peft_config.lora_alpha"]


def form_values(text: str) -> list[str]:
    """The form's fields as the YAML text sets them ("" where it does not, or where the YAML does not parse)."""
    try:
        raw = parse_yaml(text or "")
    except PhituneError:
        return [""] * len(FORM_FIELDS)
    values = []
    for key in FORM_FIELDS:
        section, name = key.split(".")
        value = (raw.get(section) or {}).get(name) if isinstance(raw.get(section) or {}, dict) else None
        values.append("" if value is None else str(value))
    return values


def apply_form(text: str, values: list[str]) -> str:
    """The YAML text with the form's fields set, through the same `--set` code as the CLI (an emptied field
    removes its key, so the default applies); comments of the text are not kept."""
    raw = parse_yaml(text or "")
    from phitune.config.schema import apply_overrides

    for key, value in zip(FORM_FIELDS, values):
        section, name = key.split(".")
        if str(value).strip():
            apply_overrides(raw, [f"{key}={value}"])
        elif isinstance(raw.get(section), dict):
            raw[section].pop(name, None)
    return yaml.safe_dump(raw, sort_keys=False)


def parse_yaml(text: str) -> dict:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise PhituneError(f"not valid YAML ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise PhituneError("the top level must be a mapping with sections model, data, training_config, peft_config")
    return raw


def split_problems(message: str) -> list[str]:
    """`invalid config: a; b; c` (config_from_dict's one error) as [a, b, c]."""
    body = message.removeprefix("invalid config: ")
    return [part.strip() for part in body.split("; ") if part.strip()]


def _hub_dataset(value: str) -> bool:
    """A hub dataset id (user/name, no file suffix, not a local path) is not a file of the folders."""
    return (not value.startswith((".", "/", "~")) and value.count("/") == 1 and not Path(value).suffix
            and not Path(value).exists())


def _has_secret(value) -> bool:
    if isinstance(value, dict):
        return any(k in SECRET_KEYS or _has_secret(v) for k, v in value.items())
    return False


def _drop_secrets(value):
    if isinstance(value, dict):
        return {k: _drop_secrets(v) for k, v in value.items() if k not in SECRET_KEYS}
    return value
