"""Tokenising for the transformers engine: prompts (text or chat template), continuations,
end-of-turn ids and what the chat template accepts."""

from __future__ import annotations

from typing import Any

from services.common.errors import InvalidArgument
from services.loader.engine import ChatPrompt

__all__ = ["Tokens"]

# End-of-turn tokens of common chat templates: generation stops at them too.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


class Tokens:
    """A tokenizer plus the facts generation needs (pad id, end ids, chat template roles)."""

    def __init__(self, tokenizer: Any, generation_config: Any) -> None:
        self.tokenizer = tokenizer
        self.pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.eos_ids = self._eos_ids(generation_config)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.has_system_role = self._probe_system_role()

    def _eos_ids(self, generation_config: Any) -> set[int]:
        ids: set[int] = set()
        for value in (
            self.tokenizer.eos_token_id,
            getattr(generation_config, "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        for token in _END_OF_TURN:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return ids

    def _probe_system_role(self) -> bool:
        if not self.has_chat_template:
            return False
        try:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": "QSENS-SYS"}, {"role": "user", "content": "hi"}],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception:  # a template that rejects the system role raises anything
            return False
        return "QSENS-SYS" in str(rendered)

    def encode_prompt(self, prompt: ChatPrompt | str, field: str) -> list[int]:
        """Token ids of a prompt; chats get the chat template (and the generation prompt)."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        self._check_chat(prompt, field)
        messages = [{"role": r, "content": c} for r, c in prompt.messages]
        text = self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not prompt.continue_final_message,
            continue_final_message=prompt.continue_final_message,
        )
        return list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])

    def _check_chat(self, prompt: ChatPrompt, field: str) -> None:
        if not self.has_chat_template:
            raise InvalidArgument(f"{field}.chat", "this model has no chat template; send text")
        if not prompt.messages:
            raise InvalidArgument(f"{field}.chat.messages", "at least one message is required")
        for j, (role, _content) in enumerate(prompt.messages):
            if role not in ("system", "user", "assistant"):
                raise InvalidArgument(
                    f"{field}.chat.messages[{j}].role",
                    f"unknown role {role!r} (system, user, assistant)",
                )
            if role == "system" and not self.has_system_role:
                raise InvalidArgument(
                    f"{field}.chat.messages[{j}].role",
                    "this model's chat template has no system role",
                )
        if prompt.continue_final_message and prompt.messages[-1][0] != "assistant":
            raise InvalidArgument(
                f"{field}.chat.continue_final_message",
                "the last message must be from the assistant",
            )

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a continuation or response (no special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_string(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))
