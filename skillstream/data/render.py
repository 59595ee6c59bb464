"""Render examples to token ids with the tokenizer's chat template; loss only on what the model
should write (the completion, or the assistant turns of a conversation)."""
from __future__ import annotations

from dataclasses import dataclass

from .examples import Example
from .tool_chat import template_supports_tools, to_plain_messages

IGNORE = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    group: str | None = None  # the class label of a classification example (class-balanced replay)


def user_text(ex: Example) -> str:
    """What the user says for a prompt/completion or classification example."""
    if ex.kind == "classification":
        return f"{ex.instruction}\nOptions: {', '.join(ex.options)}\n{ex.prompt}"
    return f"{ex.instruction}\n{ex.prompt}" if ex.instruction else ex.prompt


class Renderer:
    """Turns examples into prompt text and token ids for one tokenizer."""

    def __init__(self, tokenizer, max_length: int, system_prompt: str | None = None):
        self.tok = tokenizer
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    # -- text ------------------------------------------------------------------------------
    def _chat(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            if not (self.has_template and template_supports_tools(self.tok)):  # see data/tool_chat.py
                messages, tools = to_plain_messages(messages, tools, self.system_prompt), None
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        if self.has_template:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                **({"tools": tools} if tools else {}))
        text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")

    def chat(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
        """A conversation as text with the chat template (tool schemas and calls as in data/tool_chat.py)."""
        return self._chat(messages, add_generation_prompt, tools)

    def prompt_text(self, ex: Example) -> str:
        """The text the model continues from at evaluation time."""
        if ex.kind == "messages":
            last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
            return self._chat(ex.messages[:last], add_generation_prompt=True, tools=ex.tools)
        return self._chat([{"role": "user", "content": user_text(ex)}], add_generation_prompt=True)

    def answer_text(self, ex: Example, answer: str) -> str:
        """How the answer continues the prompt, end-of-turn marker included."""
        prompt = self._chat([{"role": "user", "content": user_text(ex)}], add_generation_prompt=True)
        full = self._chat([{"role": "user", "content": user_text(ex)}, {"role": "assistant", "content": answer}], False)
        if full.startswith(prompt):
            return full[len(prompt):]
        return answer + (self.tok.eos_token or "")

    # -- tokens ----------------------------------------------------------------------------
    def _ids(self, text: str, first: bool) -> list[int]:
        return self.tok(text, add_special_tokens=first)["input_ids"]

    def segments(self, ex: Example) -> list[tuple[str, bool]]:
        """(text, trainable) pieces whose concatenation is the rendered example."""
        if ex.kind == "text":
            return [(ex.text + (self.tok.eos_token or ""), True)]
        if ex.kind == "messages":
            pieces, done = [], ""
            for i, m in enumerate(ex.messages):
                upto = self._chat(ex.messages[: i + 1], add_generation_prompt=False, tools=ex.tools)
                if m["role"] == "assistant":
                    # the assistant header belongs to the prompt; only the reply is learned
                    head = self._chat(ex.messages[:i], add_generation_prompt=True, tools=ex.tools) if i else ""
                    if head.startswith(done) and upto.startswith(head):
                        pieces += [(head[len(done):], False), (upto[len(head):], True)]
                    else:
                        pieces.append((upto[len(done):], True))
                else:
                    pieces.append((upto[len(done):], False))
                done = upto
            return [(t, trainable) for t, trainable in pieces if t]
        return [(self.prompt_text(ex), False), (self.answer_text(ex, ex.completion), True)]

    def tokenize(self, ex: Example) -> Tokenized:
        ids, labels = [], []
        for i, (text, trainable) in enumerate(self.segments(ex)):
            piece = self._ids(text, first=i == 0)
            ids += piece
            labels += piece if trainable else [IGNORE] * len(piece)
        truncated = len(ids) > self.max_length
        group = ex.completion if ex.kind == "classification" else None
        return Tokenized(ids[: self.max_length], labels[: self.max_length], truncated, group)
