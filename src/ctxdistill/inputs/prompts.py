"""Records of a prompt and a privileged context (SDFT's input: TRL's `{prompt, privileged_context}`, or
`{prompt, document_id}` naming a document), checked field by field, and the teacher prompt built from them.

A prompt is text or chat messages; a privileged context is text or chat messages (joined by newlines, as
TRL). The teacher prompt is a template with `{prompt}` and `{privileged_context}` filled in one pass (other
braces stay as they are): TRL's default `TRL_TEMPLATE`, or the paper code's `PAPER_TEMPLATE`. A chat prompt
keeps its earlier turns and its last user turn becomes the filled template (TRL's
DemonstrationTeacherContextBuilder). Tokenising is the method's (`generation.sampling.prompt_ids`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import CtxDistillError

TRL_TEMPLATE = "{prompt}\n\n{privileged_context}"
PAPER_TEMPLATE = ("{prompt}\n\nThis is an example for a response to the question:\n{privileged_context}\n\n"
                  "Now answer with a response of your own, including the thinking process.")
PLACEHOLDER = re.compile(r"\{(prompt|privileged_context)\}")


@dataclass(frozen=True)
class PromptRecord:
    """One validated input: the student's prompt (text or chat messages) and the teacher's privileged context."""

    id: str
    prompt: Any
    privileged_context: str


def message_text(content) -> str:
    if isinstance(content, list):  # multimodal-style parts: keep the text ones (as TRL)
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
    return str(content)


def context_text(context) -> str:
    """A privileged context as text: a string, or chat messages whose contents are joined by newlines (as TRL)."""
    if isinstance(context, str):
        return context
    if isinstance(context, list) and all(isinstance(m, dict) for m in context):
        return "\n".join(t for t in (message_text(m.get("content", "")) for m in context) if t)
    raise CtxDistillError(f"privileged_context must be text or a list of chat messages, got {type(context).__name__}")


def check_prompt(where: str, prompt) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise CtxDistillError(f"{where}: field 'prompt' is empty")
        return
    if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)):
        raise CtxDistillError(f"{where}: field 'prompt' must be text or a non-empty list of chat messages {{role, content}}")
    if prompt[-1]["role"] != "user":
        raise CtxDistillError(f"{where}: a chat prompt must end with a user turn (the teacher's context is added to it), "
                              f"got role {prompt[-1]['role']!r}")


def fill_template(template: str, prompt: str, context: str) -> str:
    """The template with {prompt} and {privileged_context} replaced in one pass (other braces stay as they are)."""
    values = {"prompt": prompt, "privileged_context": context}
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def teacher_prompt(prompt, context: str, template: str):
    """TRL's composition: a text prompt becomes the filled template; a chat prompt keeps its earlier turns and
    its last user turn becomes the filled template."""
    if isinstance(prompt, list):
        return prompt[:-1] + [{"role": "user", "content": fill_template(template, message_text(prompt[-1]["content"]), context)}]
    return fill_template(template, prompt, context)


def read_record(where: str, raw: dict, documents: dict[str, str], *, id_field: str, method: str, expected: str,
                documents_flag: str, documents_path: str = "") -> PromptRecord:
    """One input row as a PromptRecord, or one line naming the row and what is wrong with it."""
    fields = ", ".join(raw) or "none"
    if "prompt" not in raw:
        raise CtxDistillError(f"{where}: {method} needs field 'prompt' in every record, but it is missing (fields present: {fields}); "
                              f"expected {expected}")
    check_prompt(where, raw["prompt"])
    if raw.get("privileged_context") is not None:
        try:
            context = context_text(raw["privileged_context"])
        except CtxDistillError as exc:
            raise CtxDistillError(f"{where}: {exc}") from None
    elif raw.get("document_id") is not None:
        if not documents:
            raise CtxDistillError(f"{where}: the record names document_id {raw['document_id']!r}; pass the documents with {documents_flag}")
        if str(raw["document_id"]) not in documents:
            raise CtxDistillError(f"{where}: document_id {raw['document_id']!r} is not in {documents_flag} {documents_path}")
        context = documents[str(raw["document_id"])]
    else:
        raise CtxDistillError(f"{where}: {method} needs field 'privileged_context' (or 'document_id' with {documents_flag}) in every "
                              f"record, but it is missing (fields present: {fields}); expected {expected}")
    if not context.strip():
        raise CtxDistillError(f"{where}: field 'privileged_context' is empty; the teacher needs something the student does not see")
    return PromptRecord(str(raw.get(id_field, where)), raw["prompt"], context)
