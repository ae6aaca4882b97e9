"""The Phi family's chat templates and their training variants with {% generation %} markers.

Assistant-only loss needs to know which tokens the assistant wrote: Hugging Face marks them with {% generation %}
blocks in the chat template (`return_assistant_tokens_mask`). Phi-3 (`<|role|>\ncontent<|end|>\n`), Phi-4
(ChatML-style `<|im_start|>role<|im_sep|>content<|im_end|>`) and Phi-4-mini (`<|role|>content<|end|>`, tool
definitions in the system turn between `<|tool|>` and `<|/tool|>`) get theirs here. TRL's Phi-3 variant is not used:
its generation block also holds the "\n" after `<|end|>` and the eos after the last turn, which the model never
writes (generation stops at `<|end|>`).

The family is told from the tokenizer's own template text, never from the model name, so a fine-tune or a local copy
of Phi-4 is recognised too. The templates below were written from the model cards and tokenizer configs of
microsoft/phi-4 and microsoft/Phi-4-mini-instruct, not downloaded; `training_template_for` therefore checks that the
training variant renders a probe conversation exactly as the tokenizer's own template does, and refuses otherwise.

Trained tokens (mask 1): each assistant turn's content and the token that closes it (`<|end|>` for Phi-3 and
Phi-4-mini, `<|im_end|>` for Phi-4). The role header and every system, user and tool turn are masked, and so is the
eos that Phi-3 and Phi-4-mini put after a whole conversation: generation stops at `<|end|>`, so the model never writes
that eos. Phi-3's chat tokens strip the whitespace after them (`rstrip` in its tokenizer, and in llama.cpp), so the
"\n" after `<|end|>` is part of that token, and whitespace an assistant message starts with is part of
`<|assistant|>`, masked: the model is never asked to write it (see README, "What is trained").
"""

from __future__ import annotations

# microsoft/Phi-3-mini-4k-instruct's template (assets/phi3-tokenizer) with the assistant's content and <|end|> marked.
PHI3_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n'}}"
    "{% generation %}{{message['content'] + '<|end|>'}}{% endgeneration %}{{'\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

PHI4_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>'}}"
    "{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

PHI4_MINI_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

PHI4_MINI_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# The reasoning models' templates, as public verbatim copies of their tokenizer_config.json give them (not downloaded:
# the hubs are out of reach here; docs/reasoning.md says where each copy is). Phi-4-reasoning always opens with its
# system prompt and has no branch for a system turn of the conversation: a row's own system turn is dropped.
PHI4_REASONING_SYSTEM_PROMPT = (
    "You are Phi, a language model trained by Microsoft to help users. Your role as an assistant involves thoroughly "
    "exploring questions through a systematic thinking process before providing the final precise and accurate "
    "solutions. This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, reassessment, "
    "reflection, backtracing, and iteration to develop well-considered thinking process. Please structure your "
    "response into two main sections: Thought and Solution using the specified format: <think> {Thought section} "
    "</think> {Solution section}. In the Thought section, detail your reasoning process in steps. Each step should "
    "include detailed considerations such as analysing questions, summarizing relevant findings, brainstorming new "
    "ideas, verifying the accuracy of the current steps, refining any errors, and revisiting previous steps. In the "
    "Solution section, based on various attempts, explorations, and reflections from the Thought section, "
    "systematically present the final solution that you deem correct. The Solution section should be logical, "
    "accurate, and concise and detail necessary steps needed to reach the conclusion. Now, try to solve the "
    "following question through the above guidelines:"
)
PHI4_REASONING_CHAT_TEMPLATE = (
    "<|im_start|>system<|im_sep|>" + PHI4_REASONING_SYSTEM_PROMPT + "<|im_end|>"
    "{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>'}}"
    "{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
# The revision copied with a system branch: its prompt only when the conversation has no system turn of its own.
PHI4_REASONING_SYSTEM_BRANCH_TEMPLATE = (
    "{% if messages|length == 0 or messages[0]['role'] != 'system' %}"
    "{{'<|im_start|>system<|im_sep|>" + PHI4_REASONING_SYSTEM_PROMPT + "<|im_end|>'}}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>'}}"
    "{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# Phi-4-mini-reasoning: Phi-4-mini's format, one system turn always opened with its own sentence, a row's system text
# (and tools) after it, then every other turn.
PHI4_MINI_REASONING_SYSTEM_PROMPT = "Your name is Phi, an AI math expert developed by Microsoft."
_MINI_REASONING_TURNS = ("{% if message['role'] != 'system' %}"
                         "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}")
_MINI_REASONING_TRAINING_TURNS = (
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% elif message['role'] != 'system' %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}"
)
PHI4_MINI_REASONING_CHAT_TEMPLATE = (
    "{{ '<|system|>" + PHI4_MINI_REASONING_SYSTEM_PROMPT + "' }}"
    "{% for message in messages %}{% if message['role'] == 'system' %} {{ message['content'] }}"
    "{% if 'tools' in message and message['tools'] is not none %}{{ '<|tool|>' + message['tools'] + '<|/tool|>' }}"
    "{% endif %}{% endif %}{% endfor %}{{ '<|end|>' }}"
    "{% for message in messages %}" + _MINI_REASONING_TURNS + "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
SYSTEM_PROMPTS = (PHI4_REASONING_SYSTEM_PROMPT, PHI4_MINI_REASONING_SYSTEM_PROMPT)  # what `phitune data` looks for

TRAINING_TEMPLATES = {"phi-3": PHI3_TRAINING_TEMPLATE, "phi-4": PHI4_TRAINING_TEMPLATE,
                      "phi-4-mini": PHI4_MINI_TRAINING_TEMPLATE}

# A conversation touching every branch of both templates: system turn with tools, two exchanges, a tool result.
PROBE = [
    {"role": "system", "content": "S", "tools": '[{"name": "f"}]'},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "tool", "content": "T"},
    {"role": "assistant", "content": "A2"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A3"},
]


def template_family(template: str) -> str | None:
    """'phi-3', 'phi-4', 'phi-4-mini' or None, read from the template's own special tokens."""
    if "<|im_start|>" in template and "<|im_sep|>" in template and "<|im_end|>" in template:
        return "phi-4"
    if "<|tool|>" in template and "<|/tool|>" in template and "<|end|>" in template:
        return "phi-4-mini"
    if all(tag + "|>\\n" in template or tag + "|>\n" in template for tag in ("<|user", "<|assistant", "<|end")):
        return "phi-3"
    return None


def training_template_for(tokenizer) -> str | None:
    """The training variant of the tokenizer's template if it is Phi-3's, Phi-4's or Phi-4-mini's, else None.

    Raises ValueError when the family is recognised but the tokenizer's template renders differently from the
    training variant (another revision): training on a format the model is not prompted with would be wrong."""
    family = template_family(tokenizer.chat_template or "")
    if family is None:
        return None
    training = training_variant(family, tokenizer.chat_template)
    for add_generation_prompt in (False, True):
        probe = PROBE[:-1] if add_generation_prompt else PROBE
        own, ours = (tokenizer.apply_chat_template(probe, chat_template=t, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)
                     for t in (tokenizer.chat_template, training))
        if own != ours and family == "phi-3":
            return None  # an older Phi-3 revision (bos first, no system turn): TRL's handling, as before
        if own != ours:
            raise ValueError(f"the tokenizer's chat template looks like {family}'s but renders differently from "
                             f"phitune's training variant ({own[:80]!r} vs {ours[:80]!r})")
    return training


def training_variant(family: str, template: str) -> str:
    """phitune's training variant of a `family` template; Phi-4-mini-reasoning's is its own text with markers put
    around the assistant turns, so a fine-tune that reworded the system sentence keeps its own."""
    if family == "phi-4-mini" and _MINI_REASONING_TURNS in template:
        return template.replace(_MINI_REASONING_TURNS, _MINI_REASONING_TRAINING_TURNS)
    return TRAINING_TEMPLATES[family]
