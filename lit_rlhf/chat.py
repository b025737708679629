"""Token-in/token-out conversations: the opening prompt's token ids, and the tokens the chat template adds for
the environment's messages after a model turn (the *delta*), so that a trajectory is one token sequence built
by appending. The model's sampled ids are never decoded and encoded again: what it is trained on is exactly
what it sampled (decoding and re-encoding can change tokens at the turn boundaries; TRL issues #5224, #5144).

A delta is right only for templates that render a conversation as the rendering of its beginning plus more
text. :meth:`ChatRenderer.check` refuses a template that rewrites earlier turns (e.g. drops the reasoning of
past assistant turns) before any weight loads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

from lit_rlhf.errors import ConfigError

Message = dict[str, Any]
_MARK = "\u2063lit-rlhf-content\u2063"  # content whose rendering is easy to find (an invisible separator)


class ChatRenderer:
    """Renders conversations with ``tokenizer``'s chat template, with ``tools`` offered through its ``tools=``."""

    def __init__(self, tokenizer: Any, tools: Optional[Sequence[Callable[..., Any]]] = None) -> None:
        if tokenizer.chat_template is None:
            raise ConfigError(
                "model.environment: multi-turn rollouts render conversations with the policy tokenizer's chat "
                "template, and this tokenizer has none: set tokenizer.chat_template in the checkpoint"
            )
        self.tokenizer = tokenizer
        self.tools = list(tools) if tools else None
        self.closing = self.assistant_closing()  # rendered once: every delta of every turn needs it

    def text(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        """The conversation as the template writes it."""
        return self.tokenizer.apply_chat_template(
            list(messages), tools=self.tools, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        """Token ids of template text (the template writes its special tokens itself)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def opening(self, messages: Sequence[Message]) -> list[int]:
        """The opening conversation followed by the assistant header: the first prompt of a trajectory."""
        return self.encode(self.text(messages, add_generation_prompt=True))

    def template_renders_tools(self) -> bool:
        """Whether the template writes the tools into the conversation (many ignore ``tools=`` silently)."""
        probe = [{"role": "user", "content": "hi"}]
        without_tools = self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        return self.text(probe, True) != without_tools

    def assistant_closing(self) -> str:
        """The text the template writes after an assistant message's content (``<|im_end|>\\n`` for ChatML)."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
        rendered = self.text(probe, False)
        if _MARK not in rendered:
            raise ConfigError("model.environment: the chat template does not write an assistant message's content")
        return rendered.split(_MARK, 1)[1]

    def delta(self, conversation: Sequence[Message], new_messages: Sequence[Message], model_text_end: str) -> list[int]:
        """The token ids that follow the model's sampled turn (the last message of ``conversation``): what is
        left of the template's closing of that turn, the ``new_messages``, and the next assistant header.

        ``model_text_end`` is the text of the model's stop token when it sampled one ('' when it did not): the
        part of the closing the model wrote itself.
        """
        before = self.text(conversation, add_generation_prompt=False)
        after = self.text([*conversation, *new_messages], add_generation_prompt=True)
        if not after.startswith(before):
            raise ConfigError(
                "model.environment: the policy's chat template renders earlier turns differently once more messages "
                "follow (it rewrites the conversation), so a trajectory cannot be built by appending tokens. Use a "
                "template that only appends (e.g. ChatML, Llama 3) or set policy.model_name_or_path's chat_template"
            )
        closing = self.closing
        if model_text_end and closing.startswith(model_text_end):
            closing = closing[len(model_text_end):]
        return self.encode(closing + after[len(before):])

    def check(self) -> None:
        """Refuse, before any weight loads, a template for which deltas are wrong: one that rewrites earlier
        turns when a conversation goes on, or whose deltas do not add up to the whole conversation."""
        opening = [{"role": "user", "content": "What is 2 + 3?"}]
        turn = {"role": "assistant", "content": "<think>Let me compute.</think> 5"}  # reasoning some templates drop
        reply = [{"role": "user", "content": "Go on."}]
        closing = self.closing
        built = self.text(opening, True) + turn["content"]
        self.delta([*opening, turn], reply, "")  # raises if the template rewrites the conversation
        whole = self.text([*opening, turn, *reply], True)
        remainder = whole[len(self.text([*opening, turn], False)):]
        if not (built + closing + remainder) == whole:
            raise ConfigError(
                "model.environment: the policy's chat template writes something between the assistant header and "
                "the message content that depends on the content (its delta rendering would differ from the "
                "whole conversation); use a template that only appends, such as ChatML or Llama 3's"
            )
