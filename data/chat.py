"""Chat messages -> text and ids: a Hugging Face directory's chat template, rendered as transformers renders it, or
ChatML for a model without one. The server renders requests with it (sampling/server.py), the chat and preference
data formats render training records with it (data/formats.py).

A template comes from `chat_template.jinja` or tokenizer_config.json's `chat_template` (the template named
'default' when it holds several). Its text already holds whatever tokens start a conversation (a BOS token), so it
is encoded as it is, as transformers' `apply_chat_template` does. A model without one (a workdir trained here)
reads ChatML after the end-of-document token, as every document it saw started:

    <|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n

and its answer ends at the text `<|im_end|>`. A template's answer ends at the end-of-turn token its model generates
(tokenizer_config.json's `eos_token`, generation_config.json's `eos_token_id`), which the server treats as the end
of the text.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import pathlib

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from data.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatError(ValueError):
    """Messages the template cannot render (the server answers 400 with the message)."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    source: str = CHATML
    special: dict[str, str] = dataclasses.field(default_factory=dict)  # bos_token, eos_token, ...: their text
    stop_ids: frozenset[int] = frozenset()  # tokens that end an answer (besides the end-of-document token)

    @property
    def stop(self) -> tuple[str, ...]:
        """Texts that end an answer: ChatML's end of turn (a template's is a token: `stop_ids`)."""
        return ("<|im_end|>",) if self.source == CHATML else ()

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return _compiled(self.source).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special
            )
        except jinja2.TemplateError as e:
            raise ChatError(f"the chat template cannot render these messages: {e}") from None

    @property
    def starts_document(self) -> bool:
        """ChatML text follows the tokenizer's document start (a template's text holds its own BOS token)."""
        return self.source == CHATML

    def encode(self, tokenizer: Tokenizer, text: str, first: bool = True) -> list[int]:
        """The ids of rendered `text`; `first`: the conversation's first piece, which ChatML starts with the
        tokenizer's document start (a prompt, as sampling.decode.prompt_ids reads it)."""
        start = tokenizer.document_start if first and self.starts_document else []
        return [*start, *tokenizer.encode(text)]

    def prompt(self, tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
        return self.encode(tokenizer, self.render(messages))


@functools.cache
def _compiled(source: str) -> jinja2.Template:
    """A template compiled once per process (compiling costs more than rendering a conversation)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatError(f"the chat template does not compile: {e}") from None


def messages_of(value) -> list[dict]:
    """The `messages` of a chat request, each {role, content} with content as text (a list of text parts joined);
    ChatError names the first that is not."""
    if not isinstance(value, list) or not value:
        raise ChatError("messages: must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise ChatError(f"messages[{i}]: must be an object with a role and a content")
        if message["role"] not in ROLES:
            raise ChatError(f"messages[{i}].role={message['role']!r}: one of {', '.join(ROLES)}")
        content = message["content"]
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content: must be text (a string, or a list of text parts)")
        out.append({**message, "content": content})
    return out


def _raise(message: str):
    raise jinja2.TemplateError(message)


def read_template(hf_dir: str | pathlib.Path, tokenizer: Tokenizer) -> ChatTemplate:
    """The chat template of a Hugging Face directory (ChatML when it has none)."""
    hf_dir = pathlib.Path(hf_dir).expanduser()
    config = _json(hf_dir / "tokenizer_config.json")
    source = config.get("chat_template")
    if isinstance(source, list):  # several named templates
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if (hf_dir / "chat_template.jinja").is_file():
        source = (hf_dir / "chat_template.jinja").read_text()
    if not isinstance(source, str) or not source:
        return ChatTemplate()
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    vocab = tokenizer.to_tokenizers()
    stop = {vocab.token_to_id(special["eos_token"])} if "eos_token" in special else set()
    eos = _json(hf_dir / "generation_config.json").get("eos_token_id")
    stop |= set(eos if isinstance(eos, list) else [eos])
    stop_ids = frozenset(i for i in stop if isinstance(i, int) and i != tokenizer.eod_id)
    return ChatTemplate(source, special, stop_ids)


def _json(path: pathlib.Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
