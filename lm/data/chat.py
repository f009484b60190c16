"""Chat templates: a conversation as the model's text, and the spans of it a fine-tuning run trains on.

Templates are Jinja, rendered the way transformers' `apply_chat_template` renders them (a sandboxed environment
with `trim_blocks`, `lstrip_blocks`, loop controls, its `tojson` filter and the `raise_exception` / `strftime_now`
globals; variables `messages`, `add_generation_prompt` and the tokenizer's special tokens), so a Hugging Face
model's own `chat_template` (its `tokenizer_config.json`) gives the text that model was tuned on. lm's own
tokenizers carry no template; they get `PLAIN_TEMPLATE`:

    System: {system}
    User: {user}
    Assistant: {assistant}</s>User: {user}
    Assistant:

Trained spans (`assistant_spans`): for each assistant message, the text between the conversation before it rendered
with the generation prompt and the conversation up to it rendered without one: the message itself and whatever
the template closes a turn with (an end-of-turn token, EOS), so the model learns where its turns end.
"""

from __future__ import annotations

import datetime
import functools
import json

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from lm.errors import ChatTemplateError

ROLES = ("system", "user", "assistant")
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: Jinja's own escapes HTML characters, which chat templates must not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise ChatTemplateError(message)


def _strftime_now(format_string):
    return datetime.datetime.now().strftime(format_string)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"the chat template does not parse ({error})") from None


def render(template: str, messages: list[dict], special_tokens: dict[str, str],
           add_generation_prompt: bool = False) -> str:
    """The text of `messages` under `template` (what `apply_chat_template(..., tokenize=False)` returns)."""
    try:
        return _compile(template).render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"the chat template failed: {error}") from None


def assistant_spans(template: str, messages: list[dict], special_tokens: dict[str, str]
                    ) -> tuple[str, list[tuple[int, int]]]:
    """`(text, spans)`: the rendered conversation and the `[start, end)` character spans of its assistant turns
    (module docstring). Raises ChatTemplateError when the template renders earlier turns differently once later
    ones follow (then no span of the whole text is any one turn's)."""
    text = render(template, messages, special_tokens)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(template, messages[:i], special_tokens, add_generation_prompt=True)
        through = render(template, messages[:i + 1], special_tokens)
        if not (through.startswith(before) and text.startswith(through)):
            raise ChatTemplateError(f"the chat template renders turns before assistant message {i} differently once it "
                                f"follows, so its trained tokens cannot be found")
        spans.append((len(before), len(through)))
    return text, spans
